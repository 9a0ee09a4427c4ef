"""The drift monitor (worker/drift.py): no drift on stationary traffic, with and
without anomalous episodes; a clear shift opens within 2 000 records; a model that
fits again resolves it; the incident record (docs/contract.md#drift), valid under
worker/incident.schema.json."""

from __future__ import annotations

import copy

import jsonschema
import numpy as np
import orjson
import pytest

from tests.support import normal_rows
from training.fit import TrainConfig, fit
from worker.drift import BLOCKS_PER_WINDOW, DriftMonitor, Reference, Transition
from worker.incidents import incident_schema

DIM = 8
FEATURES = [f"s{i}" for i in range(DIM)]


VALIDATOR = jsonschema.Draft202012Validator(incident_schema())


def body_of(t: Transition) -> dict:
    """The incident's JSON, validated against the incident topic's schema."""
    body = orjson.loads(t.output[1])
    VALIDATOR.validate(body)
    return body


def published(model):
    """The manifest as a published checkpoint has it: with its version."""
    return model.manifest.model_copy(update={"version": "20261130T100000000Z-abc123"})


def synthetic_reference(n_cal: int = 2001, n_calibration: int = 1_000_000) -> Reference:
    return Reference(
        version="v-synthetic",
        alpha=0.01,
        n_cal=n_cal,
        n_calibration=n_calibration,
        feature_names=tuple(FEATURES),
        center=np.zeros(DIM),
        scale=np.ones(DIM),
    )


def feed(monitor: DriftMonitor, p: np.ndarray, rows: np.ndarray, batch: int = 512):
    """Batches in order; returns (transitions, row index after which each came, max |T|)."""
    found, worst = [], 0.0
    for start in range(0, len(p), batch):
        end = min(start + batch, len(p))
        for t in monitor.observe("features", p[start:end], rows[start:end], now_ms=end):
            found.append((end, t))
        state = monitor.topics["features"]
        if state.tested:
            worst = max(worst, abs(state.statistic))
    return found, worst


def with_episodes(p: np.ndarray, rng, share: float = 0.01, length: int = 25) -> np.ndarray:
    """Plant anomalous episodes (runs of tiny p-values) covering `share` of the rows."""
    p = p.copy()
    for start in rng.choice(len(p) - length, size=int(share * len(p) / length), replace=False):
        p[start : start + length] = rng.uniform(1e-9, 1e-4, size=length)
    return p


def test_uniform_p_values_never_open_drift_over_a_million_records():
    rng = np.random.default_rng(1)
    n = 1_000_000
    monitor = DriftMonitor(window=2000)
    monitor.reference = synthetic_reference()
    p = rng.uniform(size=n).astype(np.float32)
    found, worst = feed(monitor, with_episodes(p, rng), np.zeros((n, DIM), np.float32), 4096)
    assert found == []
    state = monitor.topics["features"]
    assert state.tests == n // 200 - 9  # every step once the first window filled
    assert worst <= state.max_abs_statistic < 5.0  # the level is 6: not a near miss either
    assert monitor.summary() == {
        "features": {
            "tests": state.tests,
            "max_abs_statistic": round(state.max_abs_statistic, 2),
            "opened": 0,
            "open": False,
        }
    }


@pytest.mark.parametrize("side", ["scores rise", "scores fall"])
def test_a_shift_of_the_p_values_opens_within_2000_records(side):
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(window=2000)
    monitor.reference = synthetic_reference()
    before = rng.uniform(size=10_000)
    # a moderate, clear shift: half the rows keep their p-value, half fall (or rise)
    after = rng.uniform(size=4000)
    half = rng.random(4000) < 0.5
    after[half] = after[half] ** 3 if side == "scores rise" else after[half] ** (1 / 3)
    p = np.concatenate([before, after]).astype(np.float32)
    found, _ = feed(monitor, p, np.zeros((len(p), DIM), np.float32), 100)
    assert len(found) == 1
    at, t = found[0]
    assert t.status == "open"
    assert 10_000 < at <= 12_000
    statistic = orjson.loads(t.output[1])["statistic"]
    assert (statistic < 0) == (side == "scores rise")


@pytest.fixture(scope="module")
def model():
    """A real model: 4 000 normal rows, all of them calibrating (the knn default; a tail
    fitted)."""
    return fit(normal_rows(4000, seed=0, dim=DIM), FEATURES, TrainConfig(max_epochs=10, seed=0))


def test_a_real_models_p_values_on_fresh_normal_traffic_open_no_drift(model):
    """180 000 fresh normal rows with 1 % in anomalous episodes (spikes), scored by a
    real model: its calibration (every normal row, leave-one-out) is what the test
    compares against."""
    rng = np.random.default_rng(3)
    rows = normal_rows(180_000, seed=11, dim=DIM)
    episode = np.zeros(len(rows), bool)
    for start in rng.choice(len(rows) - 20, size=len(rows) // 100 // 20, replace=False):
        j = rng.integers(DIM)
        rows[start : start + 20, j] += 6 * model.manifest.scaler.scale[j]
        episode[start : start + 20] = True
    scores = model.scorer().score_batch(rows, explain="none")
    assert scores.is_anomaly[episode].mean() > 0.5  # episodes, most of their rows flagged
    assert 0.005 < scores.is_anomaly[~episode].mean() < 0.02  # calibrated for 1 %
    monitor = DriftMonitor(window=2000)
    monitor.model_changed(model.manifest)
    assert monitor.reference.n_calibration == 4000
    found, _ = feed(monitor, scores.p_values, rows)
    assert found == []
    state = monitor.topics["features"]
    assert state.tests == len(rows) // 200 - 9
    assert state.max_abs_statistic < 5.0


def test_a_new_operating_point_opens_drift_names_the_features_and_a_refit_resolves_it(model):
    monitor = DriftMonitor(window=2000, top_features=3)
    manifest = published(model)
    monitor.model_changed(manifest)
    scorer = model.scorer()
    normal = normal_rows(20_000, seed=12, dim=DIM)
    shifted = normal_rows(6000, seed=13, dim=DIM)
    shifted[:, [2, 5]] += 1.5 * model.manifest.scaler.scale[2]  # two sensors move
    rows = np.concatenate([normal, shifted])
    found, _ = feed(monitor, scorer.score_batch(rows, explain="none").p_values, rows, 256)
    assert [t.status for _, t in found] == ["open"]
    at, opened = found[0]
    assert len(normal) < at <= len(normal) + 2000
    body = body_of(opened)
    assert {f["name"] for f in body["top_features"][:2]} == {"s2", "s5"}
    assert body["model_version"] == manifest.version

    # the traffic returns to the model's operating point (as it does for a model
    # refitted on the new one: tests/integration/test_drift.py): the incident resolves
    monitor.model_changed(manifest)
    back = normal_rows(6000, seed=15, dim=DIM)
    found, _ = feed(monitor, scorer.score_batch(back, explain="none").p_values, back)
    assert [t.status for _, t in found] == ["resolved"]
    resolved = found[0][1]
    assert resolved.incident_id == opened.incident_id
    done = body_of(resolved)
    assert (done["status"], done["incident_id"]) == ("resolved", body["incident_id"])
    assert done["ended_at_ms"] is not None and done["level"] == monitor.resolve_level
    # one full window to refill, one window of quiet tests
    assert found[0][0] <= 2 * monitor.window + 512


def test_the_incident_record():
    monitor = DriftMonitor(window=100, top_features=2, instance="w1")
    monitor.reference = synthetic_reference()
    rows = np.zeros((200, DIM), np.float32)
    rows[:, 3] = 4.0
    found, _ = feed(monitor, np.full(200, 0.1, np.float32), rows, 7)
    assert len(found) == 1
    key, value, headers = found[0][1].output
    body = body_of(found[0][1])
    assert key == b"drift/features"
    assert dict(headers) == {
        "schema": b"cae-stream.incident.v1",
        "kind": b"drift",
        "model.version": b"v-synthetic",
    }
    assert body["kind"] == "drift" and body["status"] == "open"
    assert body["incident_id"] == "drift-features-w1-v-synthetic-1"
    assert body["window"] == {"unit": "records", "size": 100, "step": 10, "records": 100}
    assert body["top_features"][0] == {"name": "s3", "shift": 4.0}
    assert body["started_at_ms"] == found[0][0] and body["ended_at_ms"] is None
    assert body["statistic"] < -6 and body["level"] == 6.0
    assert body["anomaly_share"] == 0.0 and body["mean_p_value"] == pytest.approx(0.1)


def test_a_window_mostly_anomalous_is_drift_even_with_nothing_left_to_test():
    monitor = DriftMonitor(window=100)
    monitor.reference = synthetic_reference()
    p = np.concatenate([np.random.default_rng(5).uniform(size=300), np.full(300, 1e-7)])
    found, _ = feed(monitor, p.astype(np.float32), np.zeros((600, DIM)), 10)
    assert [t.status for _, t in found] == ["open"]
    at, t = found[0]
    assert 350 <= at <= 370  # just past half a window of anomalies
    body = body_of(t)
    assert body["anomaly_share"] > 0.5
    assert monitor.topics["features"].anomaly_share == 1.0
    assert monitor.topics["features"].statistic == -np.inf


def test_blocks_split_batches_exactly():
    """However the rows arrive, the window holds the same rows: one batch or one by one."""
    rng = np.random.default_rng(4)
    p = rng.uniform(size=1000).astype(np.float32)
    rows = rng.normal(size=(1000, DIM)).astype(np.float32)
    stats = []
    for batch in (1, 37, 1000):
        monitor = DriftMonitor(window=500)
        monitor.reference = synthetic_reference()
        feed(monitor, p, rows, batch)
        state = monitor.topics["features"]
        assert len(state.blocks) == BLOCKS_PER_WINDOW
        stats.append(state.statistic)
    assert stats[0] == pytest.approx(stats[1]) == pytest.approx(stats[2])


def test_a_new_model_empties_the_windows_and_keeps_drift_open(model):
    monitor = DriftMonitor(window=100)
    monitor.reference = synthetic_reference()
    found, _ = feed(monitor, np.full(195, 1e-6, np.float32), np.zeros((195, DIM)), 50)
    state = monitor.topics["features"]
    assert [t.status for _, t in found] == ["open"] and state.current.n == 5
    monitor.model_changed(model.manifest)
    assert monitor.reference.version == model.manifest.version
    assert (len(state.blocks), state.current.n, state.tested) == (0, 0, False)
    assert state.open and state.incident_id is not None


def test_the_schema_tells_a_drift_incident_from_a_per_key_one_and_holds_it_to_its_fields():
    monitor = DriftMonitor(window=100)
    monitor.reference = synthetic_reference()
    found, _ = feed(monitor, np.full(100, 1e-6, np.float32), np.zeros((100, DIM)), 10)
    body = body_of(found[0][1])  # every row anomalous: no statistic, no mean p-value
    assert body["statistic"] is None and body["mean_p_value"] is None

    def broken(**change) -> dict:
        b = copy.deepcopy(body)
        for k, v in change.items():
            if v is ...:
                del b[k]
            else:
                b[k] = v
        return b

    for bad in (
        broken(kind="anomaly"),  # a drift body is not a per-key incident
        broken(window=...),
        broken(window={"unit": "seconds", "size": 100, "step": 10, "records": 100}),
        broken(anomaly_share=1.5),
        broken(ended_at_ms=123),  # open: no end yet
        broken(status="resolved"),  # resolved: needs its end
        broken(sequence=0),  # a per-key field
        broken(top_features=[{"name": "s1"}]),
    ):
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(bad)
    VALIDATOR.validate(broken(status="resolved", ended_at_ms=123))
