"""Drift: does the serving model still fit the stream? (docs/contract.md#drift)

Under a calibrated model the p-value of a normal row is uniform. Anomalies are what
the model is for, and they come in episodes that may cluster, so the fit test leaves
out the rows a model flags (p ≤ alpha, its target false-positive rate) and tests the
rest: a normal row's p-value given p > alpha is uniform on (alpha, 1]. Its p-value
is (1 + calibration scores ≥ its score) / (1 + n_cal), so the mean p-value of W such
rows is a rescaled Mann–Whitney statistic of their scores against the checkpoint's
(1 − alpha)·n calibration scores above alpha (n calibration rows: every normal row for
the knn score, the held-out rows for a reconstruction score; training/tail.py). While
the stream still looks like the data the model was calibrated on, that mean is the
mean of the p-value table above alpha (about (1 + alpha)/2), with variance
(1 − alpha)² (1/W + 1/n' + 1/(n'W)) / 12: the calibration sample is itself a draw, so
a small one widens the test; it is what the model was calibrated on, so it is the
right reference. The statistic is

    T = (window mean p − expected) / its standard deviation

over a sliding window of the last `window` **records** (rows, in arrival order; not
event time: a replay at any speed gives the same windows), per input topic. T < 0:
the stream scores higher than the calibration rows (more anomalous); T > 0: lower.

Repeated testing: the window moves in blocks of window/10 rows and is tested once
per block, once full. Drift opens when |T| ≥ `level` (default 6: two-sided 2·10⁻⁹
per test), or when more than `max_anomaly_share` (default ½) of the window's rows
are anomalous (no mix of episodes is a majority of the traffic; a shift that makes
most rows anomalous leaves too few to test). The expected number of false openings
is at most the sum of the per-test levels (a union bound, whatever the correlation
between overlapping windows): ≤ 2·10⁻⁹ × records / (window/10), under 1 in 10⁹
records at the defaults. It resolves after a full window's worth of consecutive tests
with |T| < `resolve_level` and the anomaly share at most `max_anomaly_share`.

The features that moved most: per feature, the window's mean in the checkpoint
scaler's units ((mean − center) / scale), largest absolute value first.

Pure: no Kafka, no clock of its own. The worker calls `observe` after scoring each
batch and publishes what it returns (worker/service.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import orjson

from worker.checkpoint import Manifest

SCHEMA_VERSION = 1
SCHEMA_HEADER = b"cae-stream.incident.v1"
BLOCKS_PER_WINDOW = 10

Output = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


@dataclass(frozen=True, slots=True)
class Reference:
    """What a model says normal traffic looks like (from its manifest)."""

    version: str
    alpha: float  # the target false-positive rate: rows with p ≤ alpha are anomalies
    n_cal: int  # calibration scores behind the p-value table
    n_calibration: int  # calibration rows the p-value table summarises (the tail's n)
    feature_names: tuple[str, ...]
    center: np.ndarray  # float64 [D]
    scale: np.ndarray  # float64 [D]

    @classmethod
    def of(cls, manifest: Manifest) -> Reference:
        n_cal = len(manifest.calibration)
        n = manifest.tail.n if manifest.tail is not None else n_cal
        return cls(
            version=manifest.version,
            alpha=manifest.target_fpr,
            n_cal=n_cal,
            n_calibration=max(n, n_cal),
            feature_names=tuple(manifest.feature_names),
            center=np.asarray(manifest.scaler.center, dtype=np.float64),
            scale=np.asarray(manifest.scaler.scale, dtype=np.float64),
        )

    @property
    def expected_mean(self) -> float:
        """Mean p-value of a normal row above alpha: the p-value table's values
        k/(n_cal + 1) above alpha are equally likely."""
        k0 = math.floor(self.alpha * (self.n_cal + 1))
        return (k0 + 1 + self.n_cal + 1) / (2 * (self.n_cal + 1))

    def sd_of_mean(self, w: int) -> float:
        """Standard deviation of the mean of w such p-values: uniform on (alpha, 1],
        compared with the (1 − alpha)·n calibration scores above alpha."""
        n = max(1.0, (1 - self.alpha) * self.n_calibration)
        return (1 - self.alpha) * math.sqrt((1 / w + 1 / n + 1 / (n * w)) / 12)


@dataclass(slots=True)
class _Block:
    n: int = 0  # rows
    n_fit: int = 0  # rows with p > alpha
    sum_p: float = 0.0  # of their p-values
    sum_x: np.ndarray | None = None  # float64 [D]


@dataclass(slots=True)
class TopicDrift:
    """One input topic's window and state, exported as metrics."""

    blocks: deque = field(default_factory=deque)  # complete _Blocks, newest last
    current: _Block = field(default_factory=_Block)
    statistic: float = 0.0  # T of the last test (0 before the first)
    anomaly_share: float = 0.0  # rows with p ≤ alpha in the last tested window
    mean_p: float = float("nan")
    tested: bool = False
    open: bool = False
    incident_id: str | None = None
    opened_at_ms: int | None = None
    quiet_tests: int = 0
    opened: int = 0  # incidents opened on this topic
    tests: int = 0  # windows tested, under every model
    max_abs_statistic: float = 0.0  # the largest finite |T| of them


@dataclass(frozen=True, slots=True)
class Transition:
    """A drift incident that opened or resolved, ready to publish."""

    topic: str
    status: str  # "open" | "resolved"
    incident_id: str
    output: Output


class DriftMonitor:
    """Per-topic sliding-window fit test of the serving model's p-values."""

    def __init__(
        self,
        window: int = 2000,
        level: float = 6.0,
        resolve_level: float = 3.0,
        max_anomaly_share: float = 0.5,
        top_features: int = 3,
        instance: str = "worker",
    ):
        if window < BLOCKS_PER_WINDOW:
            raise ValueError(f"window must be at least {BLOCKS_PER_WINDOW} records")
        if not 0 < resolve_level <= level:
            raise ValueError("need 0 < resolve_level <= level")
        self.block = window // BLOCKS_PER_WINDOW
        self.window = self.block * BLOCKS_PER_WINDOW
        self.level = level
        self.resolve_level = resolve_level
        self.max_anomaly_share = max_anomaly_share
        self.top_features = top_features
        self.instance = instance
        self.reference: Reference | None = None
        self.topics: dict[str, TopicDrift] = {}

    def model_changed(self, manifest: Manifest) -> None:
        """A new model serves: its calibration is the new reference, every window
        starts empty; open drift stays open until a window under the new model is quiet."""
        self.reference = Reference.of(manifest)
        for state in self.topics.values():
            state.blocks.clear()
            state.current = _Block()
            state.tested = False
            state.quiet_tests = 0

    def observe(
        self, topic: str, p_values: np.ndarray, rows: np.ndarray, now_ms: int
    ) -> list[Transition]:
        """Add one batch's rows (in arrival order) and their p-values; test at every
        completed block. Returns the drift incidents that opened or resolved."""
        ref = self.reference
        if ref is None:
            raise RuntimeError("model_changed() first")
        state = self.topics.get(topic)
        if state is None:
            state = self.topics[topic] = TopicDrift()
        out: list[Transition] = []
        start, n = 0, len(p_values)
        while start < n:
            cur = state.current
            take = min(self.block - cur.n, n - start)
            chunk = slice(start, start + take)
            p = p_values[chunk]
            fits = p > ref.alpha
            cur.n += take
            cur.n_fit += int(np.count_nonzero(fits))
            cur.sum_p += float(np.sum(p, dtype=np.float64, where=fits))
            sx = np.sum(rows[chunk], axis=0, dtype=np.float64)
            cur.sum_x = sx if cur.sum_x is None else cur.sum_x + sx
            start += take
            if cur.n == self.block:
                state.blocks.append(cur)
                state.current = _Block()
                if len(state.blocks) > BLOCKS_PER_WINDOW:
                    state.blocks.popleft()
                if len(state.blocks) == BLOCKS_PER_WINDOW:
                    t = self._test(topic, state, now_ms)
                    if t is not None:
                        out.append(t)
        return out

    def _test(self, topic: str, state: TopicDrift, now_ms: int) -> Transition | None:
        ref = self.reference
        w = sum(b.n for b in state.blocks)
        w_fit = sum(b.n_fit for b in state.blocks)
        state.anomaly_share = 1 - w_fit / w
        if w_fit:
            state.mean_p = sum(b.sum_p for b in state.blocks) / w_fit
            state.statistic = (state.mean_p - ref.expected_mean) / ref.sd_of_mean(w_fit)
        else:  # every row anomalous
            state.mean_p, state.statistic = float("nan"), -math.inf
        state.tested = True
        state.tests += 1
        magnitude = abs(state.statistic)
        if math.isfinite(magnitude):
            state.max_abs_statistic = max(state.max_abs_statistic, magnitude)
        overrun = state.anomaly_share > self.max_anomaly_share
        if not state.open:
            if magnitude < self.level and not overrun:
                return None
            state.open, state.opened, state.quiet_tests = True, state.opened + 1, 0
            state.opened_at_ms = now_ms
            state.incident_id = f"drift-{topic}-{self.instance}-{ref.version}-{state.opened}"
            return self._transition(topic, state, "open", now_ms)
        quiet = magnitude < self.resolve_level and not overrun
        state.quiet_tests = state.quiet_tests + 1 if quiet else 0
        if state.quiet_tests < BLOCKS_PER_WINDOW:
            return None
        transition = self._transition(topic, state, "resolved", now_ms)
        state.open, state.incident_id, state.opened_at_ms = False, None, None
        return transition

    def summary(self) -> dict:
        """Per topic: windows tested, the largest |T|, incidents opened, open now."""
        return {
            topic: {
                "tests": s.tests,
                "max_abs_statistic": round(s.max_abs_statistic, 2),
                "opened": s.opened,
                "open": s.open,
            }
            for topic, s in self.topics.items()
        }

    def moved_features(self, state: TopicDrift) -> list[dict]:
        """The window's features furthest from the scaler's center, in scale units."""
        ref = self.reference
        w = sum(b.n for b in state.blocks)
        if not w or self.top_features == 0:
            return []
        mean = sum(b.sum_x for b in state.blocks) / w
        shift = (mean - ref.center) / ref.scale
        order = np.argsort(-np.abs(shift), kind="stable")[: self.top_features]
        return [
            {"name": ref.feature_names[i], "shift": round(float(shift[i]), 4)}
            for i in order.tolist()
        ]

    def _transition(self, topic: str, state: TopicDrift, status: str, now_ms: int) -> Transition:
        ref = self.reference
        w = sum(b.n for b in state.blocks)
        body = {
            "schema_version": SCHEMA_VERSION,
            "kind": "drift",
            "incident_id": state.incident_id,
            "status": status,
            "topic": topic,
            "statistic": _finite(state.statistic, 4),
            "level": self.level if status == "open" else self.resolve_level,
            "anomaly_share": round(state.anomaly_share, 6),
            "max_anomaly_share": self.max_anomaly_share,
            "mean_p_value": _finite(state.mean_p, 6),
            "expected_mean_p_value": round(ref.expected_mean, 6),
            "window": {"unit": "records", "size": self.window, "step": self.block, "records": w},
            "model_version": ref.version,
            "top_features": self.moved_features(state),
            "started_at_ms": state.opened_at_ms,
            "ended_at_ms": now_ms if status == "resolved" else None,
        }
        headers = [
            ("schema", SCHEMA_HEADER),
            ("kind", b"drift"),
            ("model.version", ref.version.encode()),
        ]
        key = f"drift/{topic}".encode()
        return Transition(topic, status, state.incident_id, (key, orjson.dumps(body), headers))


def _finite(x: float, digits: int) -> float | None:
    """JSON has no infinities or NaN: those are null."""
    return round(x, digits) if math.isfinite(x) else None
