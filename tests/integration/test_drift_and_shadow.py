"""Drift and shadow rollout against the real embedded broker: a stream that shifts
opens a drift incident on the incident topic (docs/contract.md#drift); a candidate
checkpoint is scored in shadow and promoted or refused (#shadow-rollout); every
record is scored and committed."""

from __future__ import annotations

import threading
import time

import numpy as np
import orjson
import pytest

from tests.integration.conftest import DIM, FEATURES
from tests.integration.kafka_helpers import (
    committed_offsets,
    events_of,
    incidents_of,
    log_events,
    producer,
    read_topic,
    start_trainer,
    start_worker,
    stop_worker,
    wait_for,
    worker_env,
    worker_settings,
)
from tests.support import normal_rows
from training.fit import TrainConfig, fit
from worker import codec
from worker.checkpoint import publish
from worker.scoring import load_scorer
from worker.service import Worker

ROWS_PER_RECORD = 100


def produce_rows(bootstrap: str, topic: str, rows: np.ndarray) -> int:
    """float32-rows records of ROWS_PER_RECORD rows, in order on partition 0; returns
    how many records."""
    p = producer(bootstrap)
    futures = []
    for start in range(0, len(rows), ROWS_PER_RECORD):
        value, headers = codec.encode_float32_rows(rows[start : start + ROWS_PER_RECORD])
        futures.append(p.send(topic, key=b"plant-1", value=value, headers=headers, partition=0))
    p.flush()
    p.close()
    for f in futures:
        f.get(timeout=30)
    return len(futures)


def test_a_stream_that_shifts_opens_one_drift_incident(broker, topics, model_dir):
    normal = normal_rows(4000, seed=21, dim=DIM)
    shifted = normal_rows(3000, seed=22, dim=DIM)
    shifted[:, [1, 6]] += 3.0  # a new operating point of two sensors
    n = produce_rows(broker.bootstrap, topics["input"], np.concatenate([normal, shifted]))
    settings = worker_settings(broker.bootstrap, topics, model_dir, max_records=n)
    worker = Worker(settings)
    summary = worker.run()
    assert summary.records == n and summary.rows == 7000
    assert committed_offsets(broker.bootstrap, topics["group"], topics["input"]) == {0: n}

    # the topic also carries the per-key incident the shifted rows open on plant-1
    incidents = [
        r
        for r in read_topic(broker.bootstrap, topics["incidents"], quiet_s=2)
        if orjson.loads(r.value)["kind"] == "drift"
    ]
    assert len(incidents) == 1
    record = incidents[0]
    [body] = incidents_of([record])  # valid under worker/incident.schema.json
    assert record.key == f"drift/{topics['input']}".encode()
    assert (body["kind"], body["status"], body["topic"]) == ("drift", "open", topics["input"])
    assert body["model_version"] == worker.scorer.version
    assert {f["name"] for f in body["top_features"][:2]} == {"s1", "s6"}
    opened = worker.metrics.drift_incidents.labels(topic=topics["input"], status="open")
    assert opened._value.get() == 1
    assert worker.drift.topics[topics["input"]].open
    assert worker.metrics.drift_open.labels(topic=topics["input"])._value.get() == 1


def test_shadow_refuses_a_candidate_trained_on_anomalies_and_promotes_a_good_one(
    broker, topics, model_dir, trained
):
    _, v1, good = trained
    worker = Worker(
        worker_settings(
            broker.bootstrap, topics, model_dir, emit="all", shadow_records=2000, idle_timeout_s=60
        )
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    sent = []

    def send(n: int, seed: int) -> None:
        rows = normal_rows(n, seed=seed, dim=DIM)
        produce_rows(broker.bootstrap, topics["input"], rows)
        sent.append(rows)
        total = sum(len(r) for r in sent)
        wait_for(lambda: worker.summary.rows >= total, 60, 0.1, f"{total} rows scored")

    try:
        send(500, 31)
        # a snapshot full of anomalies: every row has a spike on one sensor
        rng = np.random.default_rng(32)
        bad_rows = normal_rows(1000, seed=33, dim=DIM)
        bad_rows[np.arange(1000), rng.integers(DIM, size=1000)] += 25.0
        bad = fit(bad_rows, FEATURES, TrainConfig(max_epochs=5, seed=3))
        v_bad = publish(model_dir, bad.model, bad.manifest)
        wait_for(lambda: worker.rollout.run is not None, 30, 0.1, "the bad candidate in shadow")
        send(2500, 34)
        wait_for(lambda: v_bad in worker.watcher.refused, 30, 0.1, "the bad candidate refused")
        # the knn default: every live normal row is far from the spiked reference rows
        assert worker.watcher.refused[v_bad] == "ShadowRateTooHigh"
        assert worker.scorer.version == v1

        v_good = publish(model_dir, good.model, good.manifest)
        wait_for(lambda: worker.rollout.run is not None, 30, 0.1, "the good candidate in shadow")
        send(2500, 35)
        wait_for(lambda: worker.scorer.version == v_good, 30, 0.1, "the good candidate serving")
        send(500, 36)
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    assert not thread.is_alive()

    rows = np.concatenate(sent)
    events = events_of(read_topic(broker.bootstrap, topics["output"], expect=len(rows)))
    assert len(events) == len(rows)
    assert len({e["event_id"] for e in events}) == len(rows)  # none lost, none twice
    # what the serving model published is its own: in shadow or not, v1's scores
    by_version = {}
    for e in events:
        by_version.setdefault(e["model"]["version"], []).append(e)
    assert set(by_version) == {v1, v_good}
    v1_events = sorted(by_version[v1], key=lambda e: (e["source"]["offset"], e["source"]["row"]))
    assert len(v1_events) >= 500 + 2500 + 2000
    v1_rows = rows[: len(v1_events)]  # one partition, in order
    want = load_scorer(model_dir / v1).score_batch(v1_rows, explain="none").scores
    got = np.array([e["score"] for e in v1_events], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert (
        worker.metrics.reloads.labels(result="refused", reason="ShadowRateTooHigh")._value.get()
        == 1
    )
    assert worker.metrics.reloads.labels(result="swapped", reason="")._value.get() == 1
    # the last candidate's measurements stay on /metrics
    assert 0 < worker.metrics.shadow_cost_ratio._value.get() < 10  # measured (timing: loose)
    assert worker.metrics.shadow_rank_correlation._value.get() > 0.5
    assert worker.metrics.shadow_records._value.get() >= 2000


class ShiftingStream(threading.Thread):
    """JSON records at `rate`/s: normal rows, then (once `shift` is set) the same rows
    with sensors 1 and 6 moved by `delta`: a new operating point. `sent` holds the
    acknowledged ids; `shifted_from` the index of the first shifted record."""

    def __init__(self, bootstrap: str, topic: str, rate: float, delta: float):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.rate, self.delta = bootstrap, topic, rate, delta
        self.shift, self.halt = threading.Event(), threading.Event()
        self.sent: set[str] = set()
        self.shifted_from: int | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        p = producer(self.bootstrap, linger_ms=50)
        rows = normal_rows(20_000, seed=51, dim=DIM)
        start, i = time.monotonic(), 0
        while not self.halt.is_set():
            row = rows[i % len(rows)].copy()
            if self.shift.is_set():
                if self.shifted_from is None:
                    self.shifted_from = i
                row[[1, 6]] += self.delta
            ident = f"r{i}"
            p.send(self.topic, key=f"k{i % 7}".encode(), value=codec.encode_json(row, id=ident))
            with self._lock:
                self.sent.add(ident)
            i += 1
            ahead = i / self.rate - (time.monotonic() - start)
            if ahead > 0:
                self.halt.wait(ahead)
        p.flush()
        p.close()


@pytest.mark.soak  # about two minutes: the whole loop, on top of the parts tested above
@pytest.mark.timeout(600)
def test_drift_retrain_shadow_promote_resolve_without_losing_a_record(
    broker, topics, model_dir, tmp_path
):
    """A stream that moves to a new operating point: the drift incident opens, the
    trainer retrains on the records since, the candidate passes shadow and serves, the
    incident resolves, the new model's false-alarm rate is within 2× its target, and
    every record got its decision."""
    wlog, tlog = tmp_path / "worker.log", tmp_path / "trainer.log"
    env = worker_env(
        broker.bootstrap, topics, model_dir, WORKER_EMIT="all", WORKER_SHADOW_RECORDS="2000"
    )
    worker = start_worker(env, wlog)
    flags = ["--out", str(model_dir), "--max-seconds", "30", "--max-records", "8000"]
    flags += ["--epochs", "25", "--every-seconds", "3600", "--keep", "10"]
    # 15 s at 400/s: ~6 000 rows since the opening, ~1 500 held out for the threshold
    flags += ["--incident-topic", topics["incidents"], "--drift-delay-seconds", "15"]
    trainer = start_trainer(broker.bootstrap, topics["input"], flags, tlog)
    stream = ShiftingStream(broker.bootstrap, topics["input"], rate=400, delta=1.5)

    def seen(event: str, after: str | None = None) -> list[dict]:
        """The worker's `event` log lines (only those after the first `after` line)."""
        lines = log_events(wlog)
        if after is not None:
            first = next((i for i, e in enumerate(lines) if e.get("event") == after), len(lines))
            lines = lines[first:]
        return [e for e in lines if e.get("event") == event]

    try:
        # the trainer's first cycle (at once) finds nothing to train on; then only drift
        wait_for(
            lambda: "retraining cycle skipped" in tlog.read_text(), 120, 0.5, "trainer up", trainer
        )
        stream.start()
        wait_for(lambda: len(stream.sent) >= 4000, 60, 0.5, "the normal phase", worker)
        assert seen("drift_opened") == []
        stream.shift.set()
        opened = wait_for(lambda: seen("drift_opened"), 60, 0.5, "drift opened", worker)
        promoted = wait_for(
            lambda: seen("shadow_promoted", after="drift_opened"), 180, 0.5, "retrained", worker
        )
        wait_for(lambda: seen("drift_resolved"), 120, 0.5, "drift resolved", worker)
        stream.halt.set()
        stream.join(30)
        expected = set(stream.sent)
        wait_for(
            lambda: (
                sum(committed_offsets(broker.bootstrap, topics["group"], topics["input"]).values())
                >= len(expected)
            ),
            120,
            0.5,
            "every record committed",
            worker,
        )
        assert stop_worker(worker) == 0
        assert stop_worker(trainer) == 0
    finally:
        stream.halt.set()
        for proc in (worker, trainer):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    events = events_of(
        read_topic(broker.bootstrap, topics["output"], expect=len(expected), timeout_s=120)
    )
    assert {e["id"] for e in events} >= expected  # none lost (duplicates allowed: at-least-once)
    new = promoted[0]["version"]
    after = [e for e in events if e["model"]["version"] == new]
    rate = sum(e["is_anomaly"] for e in after) / len(after)
    assert len(after) >= 2000 and rate <= 2 * 0.01, (len(after), rate)
    # the topic also carries the per-key incidents the shifted rows open; each message
    # of either kind is valid under worker/incident.schema.json
    messages = incidents_of(read_topic(broker.bootstrap, topics["incidents"], quiet_s=1))
    incidents = [m for m in messages if m["kind"] == "drift"]
    assert [(i["status"], i["incident_id"]) for i in incidents] == [
        ("open", opened[0]["incident_id"]),
        ("resolved", opened[0]["incident_id"]),
    ]
    assert incidents[1]["model_version"] == new
