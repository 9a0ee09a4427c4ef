"""Shadow rollout (worker/shadow.py): the verdict on a candidate's live anomaly rate,
its measured agreement, rank correlation and cost, the operator's override, and the
POST /shadow endpoint (docs/contract.md#shadow-rollout)."""

from __future__ import annotations

import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import SecretStr

from worker.health import Health, HealthServer
from worker.metrics import WorkerMetrics
from worker.scoring import BatchScores
from worker.shadow import Rollout, ShadowRun

FEATURES = ["a", "b"]


def batch_scores(scores: np.ndarray, threshold: float) -> BatchScores:
    empty = np.empty((0, 1))
    return BatchScores(
        scores=scores.astype(np.float32),
        p_values=np.ones(len(scores), np.float32),
        is_anomaly=scores >= threshold,
        explained=np.empty(0, np.int64),
        top_index=empty.astype(np.int64),
        top_contribution=empty.astype(np.float32),
        top_expected=empty.astype(np.float32),
    )


class FakeScorer:
    """A model whose score is a fixed function of the row's first feature."""

    def __init__(self, version, fn=lambda x: x, threshold=0.99, target=0.01, names=FEATURES):
        self.version, self.fn, self.threshold = version, fn, threshold
        self.feature_names = list(names)
        self.manifest = SimpleNamespace(target_fpr=target)
        self.calls = []

    def score_batch(self, x, explain="all"):
        self.calls.append(explain)
        return batch_scores(self.fn(x[:, 0]), self.threshold)


def live_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, len(FEATURES))).astype(np.float32)


def run_shadow(candidate, rows, serving=None, records=None, factor=3.0) -> ShadowRun:
    serving = serving or FakeScorer("v1")
    run = ShadowRun(candidate, serving.version, records or len(rows), factor)
    for start in range(0, len(rows), 500):
        x = rows[start : start + 500]
        run.observe(x, serving.score_batch(x), serving_s=0.01)
    return run


@pytest.mark.parametrize(
    "threshold, promote, reason",
    [
        (0.99, True, ""),  # 1 % of uniform rows: on target
        (0.975, True, ""),  # 2.5 %: within 3×
        (0.95, False, "ShadowRateTooHigh"),  # 5 %
        (0.999, False, "ShadowRateTooLow"),  # 0.1 %
    ],
)
def test_the_verdict_is_the_live_rate_against_the_band(threshold, promote, reason):
    run = run_shadow(FakeScorer("v2", threshold=threshold), live_rows(20_000))
    assert run.done
    verdict = run.verdict()
    assert (verdict.promote, verdict.reason) == (promote, reason)
    assert run.rate == pytest.approx(1 - threshold, rel=0.2)
    assert "band [0.003333, 0.03]" in verdict.detail


def test_agreement_rank_correlation_and_cost_are_measured():
    rows = live_rows(4000)
    same_order = run_shadow(FakeScorer("v2", fn=lambda x: 3 * x + 1, threshold=3.97), rows)
    assert same_order.rank_correlation() == pytest.approx(1.0)
    assert same_order.agreement == 1.0  # the same rows cross both thresholds
    reversed_ = run_shadow(FakeScorer("v3", fn=lambda x: 1 - x), rows)
    assert reversed_.rank_correlation() == pytest.approx(-1.0)
    assert reversed_.agreement == pytest.approx(0.98, abs=0.005)  # 1 % + 1 % disagree
    assert same_order.serving_s == pytest.approx(0.08) and same_order.shadow_s > 0
    assert same_order.cost_ratio == same_order.shadow_s / same_order.serving_s


def test_the_candidate_scores_without_explanations_and_leaves_the_serving_results_alone():
    serving = FakeScorer("v1")
    x = live_rows(300)
    mine = serving.score_batch(x)
    snapshot = [a.copy() for a in (mine.scores, mine.p_values, mine.is_anomaly)]
    candidate = FakeScorer("v2", fn=lambda v: 2 * v)
    run = ShadowRun(candidate, "v1", 1000, 3.0)
    run.observe(x, mine, 0.01)
    assert candidate.calls == ["none"]
    for kept, now in zip(snapshot, (mine.scores, mine.p_values, mine.is_anomaly), strict=True):
        assert np.array_equal(kept, now)


def rollout(records=1000, factor=3.0) -> Rollout:
    return Rollout(records, factor, WorkerMetrics())


def sample(r: Rollout, name: str, **labels) -> float | None:
    return r.metrics.registry.get_sample_value(name, labels or None)


def test_off_or_first_model_serves_at_once():
    assert rollout(records=0).offer(FakeScorer("v2"), FakeScorer("v1")).version == "v2"
    assert rollout().offer(FakeScorer("v1"), None).version == "v1"


def test_a_candidate_with_other_features_cannot_be_shadowed_and_serves_at_once():
    r = rollout()
    assert r.offer(FakeScorer("v2", names=["a", "c"]), FakeScorer("v1")).version == "v2"
    assert r.run is None


def test_a_candidate_runs_in_shadow_until_its_rows_are_in_then_is_decided():
    r = rollout(records=1000)
    serving = FakeScorer("v1")
    assert r.offer(FakeScorer("v2"), serving) is None
    assert sample(r, "cae_shadow_info", version="v2") == 1
    x = live_rows(600)
    r.observe(x, serving.score_batch(x), 0.01)
    assert r.decide() is None
    assert sample(r, "cae_shadow_records") == 600
    r.observe(x, serving.score_batch(x), 0.01)
    candidate, verdict = r.decide()
    assert candidate.version == "v2" and verdict.promote and verdict.decided_by == "shadow"
    assert r.run is None and r.decide() is None
    assert sample(r, "cae_shadow_info", version="v2") is None
    assert sample(r, "cae_shadow_agreement") == 1.0
    assert sample(r, "cae_shadow_rank_correlation") == pytest.approx(1.0)
    assert sample(r, "cae_shadow_target_rate") == 0.01


def test_a_newer_checkpoint_replaces_the_candidate():
    r = rollout()
    serving = FakeScorer("v1")
    r.offer(FakeScorer("v2"), serving)
    x = live_rows(500)
    r.observe(x, serving.score_batch(x), 0.01)
    r.offer(FakeScorer("v3"), serving)
    assert r.run.version == "v3" and r.run.rows == 0
    assert sample(r, "cae_shadow_info", version="v2") is None


def test_an_operator_promotes_or_refuses_only_the_candidate_in_shadow():
    r = rollout(records=10**9)
    assert r.request("promote", "v2")[0] == 409  # nothing in shadow
    r.offer(FakeScorer("v2"), FakeScorer("v1"))
    assert r.request("promote", "v9") == (409, "v9 is not in shadow (v2 is)")
    assert r.request("delete", "v2")[0] == 400
    assert r.decide() is None
    assert r.request("refuse", "v2")[0] == 200
    candidate, verdict = r.decide()
    assert (candidate.version, verdict.promote, verdict.reason) == ("v2", False, "OperatorRefused")
    assert verdict.decided_by == "operator"
    r.offer(FakeScorer("v3"), FakeScorer("v1"))
    assert r.request("promote", "v3")[0] == 200
    assert r.decide()[1].promote


def test_a_request_for_a_replaced_candidate_is_dropped():
    r = rollout(records=10**9)
    r.offer(FakeScorer("v2"), FakeScorer("v1"))
    r.request("promote", "v2")
    r.offer(FakeScorer("v3"), FakeScorer("v1"))
    assert r.decide() is None


# -- POST /shadow -------------------------------------------------------------------------


def _server(token: str | None, calls: list) -> HealthServer:
    health = Health(WorkerMetrics())
    health.shadow_request = lambda a, v: (calls.append((a, v)), (200, f"{a} {v}"))[1]
    server = HealthServer(health, "127.0.0.1", 0, SecretStr(token) if token else None)
    server.server.server_close()
    return server


def test_post_shadow_is_off_without_a_token():
    calls = []
    server = _server(None, calls)
    assert server.post("/shadow", "Bearer ", b"action=promote&version=v2")[0] == 404
    assert calls == []


@pytest.mark.parametrize(
    "auth, body, code",
    [
        (None, b"action=promote&version=v2", 401),
        ("Bearer wrong", b"action=promote&version=v2", 401),
        ("s3cret", b"action=promote&version=v2", 401),
        ("Bearer s3cret", b"action=promote", 400),
        ("Bearer s3cret", b"\xff\xfe", 400),
        ("Bearer s3cret", b"action=promote&action=refuse&version=v2", 400),
        ("Bearer s3cret", b"action=refuse&version=v2", 200),
    ],
)
def test_post_shadow_needs_the_token_and_a_well_formed_form(auth, body, code):
    calls = []
    server = _server("s3cret", calls)
    assert server.post("/shadow", auth, body)[0] == code
    assert calls == ([("refuse", "v2")] if code == 200 else [])
    assert server.post("/other", auth, body)[0] == 404


def test_post_shadow_over_http():
    calls = []
    health = Health(WorkerMetrics())
    health.shadow_request = lambda a, v: (calls.append((a, v)), (200, "ok"))[1]
    server = HealthServer(health, "127.0.0.1", 0, SecretStr("s3cret")).start()
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/shadow",
            data=b"action=promote&version=v2",
            headers={"Authorization": "Bearer s3cret"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and resp.read() == b"ok\n"
    finally:
        server.stop()
    assert calls == [("promote", "v2")]
