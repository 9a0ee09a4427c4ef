"""Drift and shadow rollout against the real embedded broker: a stream that shifts
opens a drift incident on the incident topic (docs/contract.md#drift); a candidate
checkpoint is scored in shadow and promoted or refused (#shadow-rollout); every
record is scored and committed."""

from __future__ import annotations

import numpy as np
import orjson

from tests.integration.conftest import DIM
from tests.integration.kafka_helpers import (
    committed_offsets,
    producer,
    read_topic,
    worker_settings,
)
from tests.support import normal_rows
from worker import codec
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
