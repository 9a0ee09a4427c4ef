"""Drift and shadow rollout against the real embedded broker: a stream that shifts
opens a drift incident on the incident topic (docs/contract.md#drift); a candidate
checkpoint is scored in shadow and promoted or refused (#shadow-rollout); every
record is scored and committed."""

from __future__ import annotations

import threading

import numpy as np
import orjson

from tests.integration.conftest import DIM, FEATURES
from tests.integration.kafka_helpers import (
    committed_offsets,
    events_of,
    producer,
    read_topic,
    wait_for,
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

    incidents = read_topic(broker.bootstrap, topics["incidents"], expect=1, quiet_s=1)
    assert len(incidents) == 1
    record = incidents[0]
    body = orjson.loads(record.value)
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
        assert worker.watcher.refused[v_bad] == "ShadowRateTooLow"
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
        worker.metrics.reloads.labels(result="refused", reason="ShadowRateTooLow")._value.get() == 1
    )
    assert worker.metrics.reloads.labels(result="swapped", reason="")._value.get() == 1
    # the last candidate's measurements stay on /metrics
    assert 0 < worker.metrics.shadow_cost_ratio._value.get() < 10  # measured (timing: loose)
    assert worker.metrics.shadow_rank_correlation._value.get() > 0.5
    assert worker.metrics.shadow_records._value.get() >= 2000
