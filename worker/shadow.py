"""Shadow rollout: a new checkpoint is scored beside the serving one on live batches
before it may serve (docs/contract.md#shadow-rollout).

The loop offers each verified checkpoint (`Rollout.offer`); with shadow on it becomes
the candidate, and every batch the serving model scored is scored again by the
candidate (`observe`, after the serving model: what is published never depends on
it). Once the candidate has scored `records` rows, or an operator has decided
(`request`, from the health server's thread), `decide` says promote or refuse, and why.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import structlog

from worker.metrics import WorkerMetrics
from worker.scoring import BatchScores, Scorer

log = structlog.get_logger("worker.shadow")

MAX_KEPT_SCORES = 100_000  # pairs of scores kept for the rank correlation
ACTIONS = ("promote", "refuse")
TOO_HIGH, TOO_LOW, BY_OPERATOR = "ShadowRateTooHigh", "ShadowRateTooLow", "OperatorRefused"
REFUSAL_REASONS = (TOO_HIGH, TOO_LOW, BY_OPERATOR)  # docs/contract.md#refusal-reasons


@dataclass(frozen=True, slots=True)
class Verdict:
    promote: bool
    reason: str  # "", or a refusal reason (docs/contract.md#refusal-reasons)
    detail: str
    decided_by: str  # "shadow" | "operator"


class ShadowRun:
    """One candidate's measurements on live rows."""

    def __init__(self, candidate: Scorer, serving_version: str, records: int, factor: float):
        self.candidate = candidate
        self.serving_version = serving_version
        self.records = records
        self.factor = factor
        self.rows = 0
        self.anomalies = 0
        self.agreements = 0
        self.shadow_s = 0.0
        self.serving_s = 0.0
        self._serving_scores: list[np.ndarray] = []
        self._candidate_scores: list[np.ndarray] = []
        self._kept = 0

    @property
    def version(self) -> str:
        return self.candidate.version

    @property
    def target(self) -> float:
        return self.candidate.manifest.target_fpr

    @property
    def done(self) -> bool:
        return self.rows >= self.records

    def observe(self, vectors: np.ndarray, serving: BatchScores, serving_s: float) -> None:
        t0 = time.perf_counter()
        mine = self.candidate.score_batch(vectors, explain="none")
        self.shadow_s += time.perf_counter() - t0
        self.serving_s += serving_s
        self.rows += len(vectors)
        self.anomalies += int(np.count_nonzero(mine.is_anomaly))
        self.agreements += int(np.count_nonzero(mine.is_anomaly == serving.is_anomaly))
        keep = min(len(vectors), MAX_KEPT_SCORES - self._kept)
        if keep > 0:
            self._serving_scores.append(serving.scores[:keep])
            self._candidate_scores.append(mine.scores[:keep])
            self._kept += keep

    @property
    def rate(self) -> float:
        return self.anomalies / self.rows if self.rows else 0.0

    @property
    def agreement(self) -> float:
        return self.agreements / self.rows if self.rows else 1.0

    @property
    def cost_ratio(self) -> float:
        return self.shadow_s / self.serving_s if self.serving_s > 0 else 0.0

    def rank_correlation(self) -> float:
        """Spearman's rho of the two models' scores (the first MAX_KEPT_SCORES rows)."""
        if self._kept < 2:
            return float("nan")
        a = _ranks(np.concatenate(self._serving_scores))
        b = _ranks(np.concatenate(self._candidate_scores))
        if a.std() == 0 or b.std() == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    def verdict(self) -> Verdict:
        low, high = self.target / self.factor, self.target * self.factor
        detail = (
            f"live anomaly rate {self.rate:.4g} over {self.rows} rows, target {self.target:.4g}, "
            f"band [{low:.4g}, {high:.4g}]; agreement {self.agreement:.4f}, "
            f"rank correlation {self.rank_correlation():.4f}"
        )
        if self.rate > high:
            return Verdict(False, TOO_HIGH, detail, "shadow")
        if self.rate < low:
            return Verdict(False, TOO_LOW, detail, "shadow")
        return Verdict(True, "", detail, "shadow")


def _ranks(x: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    return ranks


class Rollout:
    """Whether a verified checkpoint serves at once or after a shadow run; used by the
    loop thread, except `request` (the health server's thread)."""

    def __init__(self, records: int, max_rate_factor: float, metrics: WorkerMetrics):
        self.records = records
        self.max_rate_factor = max_rate_factor
        self.metrics = metrics
        self.run: ShadowRun | None = None
        self._lock = threading.Lock()
        self._request: tuple[str, str] | None = None  # (action, version)

    def offer(self, candidate: Scorer, serving: Scorer | None) -> Scorer | None:
        """A newly verified checkpoint: returned when it is to serve at once, else it
        becomes the candidate in shadow (replacing any earlier one) and None is returned."""
        if self.records == 0 or serving is None:
            return candidate
        if candidate.feature_names != serving.feature_names:
            log.warning(
                "shadow_skipped",
                version=candidate.version,
                reason="feature names differ from the serving model's",
                action="swapping it in at once",
            )
            return candidate
        with self._lock:
            replaced = self.run.version if self.run else None
            self.run = ShadowRun(candidate, serving.version, self.records, self.max_rate_factor)
            self._request = None
        self.metrics.shadow_info.clear()
        self.metrics.shadow_info.labels(version=candidate.version).set(1)
        self.metrics.shadow_target_rate.set(candidate.manifest.target_fpr)
        self._export()
        log.info(
            "shadow_started",
            version=candidate.version,
            serving=serving.version,
            records=self.records,
            replaced=replaced,
        )
        return None

    def observe(self, vectors: np.ndarray, serving: BatchScores, serving_s: float) -> None:
        run = self.run
        if run is None or run.done:
            return
        run.observe(vectors, serving, serving_s)
        self._export()

    def request(self, action: str, version: str) -> tuple[int, str]:
        """An operator's decision (health server thread): (HTTP status, message)."""
        if action not in ACTIONS:
            return 400, f"action must be one of {', '.join(ACTIONS)}"
        with self._lock:
            run = self.run
            if run is None or run.version != version:
                now = run.version if run else "nothing"
                return 409, f"{version} is not in shadow ({now} is)"
            self._request = (action, version)
        return 200, f"{action} {version}: applied before the next batch"

    def decide(self) -> tuple[Scorer, Verdict] | None:
        """The candidate and the verdict on it, once there is one; the run ends."""
        with self._lock:
            run, request = self.run, self._request
            if run is None:
                return None
            if request is not None and request[1] == run.version:
                promote = request[0] == "promote"
                verdict = Verdict(
                    promote,
                    "" if promote else BY_OPERATOR,
                    f"{request[0]} by an operator after {run.rows} rows in shadow",
                    "operator",
                )
            elif run.done:
                verdict = run.verdict()
            else:
                return None
            self.run, self._request = None, None
        self.metrics.shadow_rank_correlation.set(run.rank_correlation())
        self.metrics.shadow_info.clear()
        return run.candidate, verdict

    def _export(self) -> None:
        run = self.run
        if run is None:
            return
        m = self.metrics
        m.shadow_records.set(run.rows)
        m.shadow_anomaly_rate.set(run.rate)
        m.shadow_agreement.set(run.agreement)
        m.shadow_cost_ratio.set(run.cost_ratio)
