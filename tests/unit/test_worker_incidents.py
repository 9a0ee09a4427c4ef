"""A drift incident the monitor announced is published even when its batch is not:
a rewind carries it to the next batch (worker/service.py), and it leaves the list of
incidents in flight once its batch is delivered. The real Worker, with stand-ins for
the monitor, the delivery and the Kafka clients (no broker, no model)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from kafka.errors import KafkaTimeoutError

from worker.drift import Transition
from worker.scoring import BatchScores
from worker.service import Worker
from worker.settings import WorkerSettings
from worker.step import BatchOutcome, Scored

INCIDENT = (b"drift/features", b'{"kind": "drift"}', [])


class OneTransition:
    """A drift monitor that opens one incident at its first batch."""

    def __init__(self):
        self.calls = 0
        self.topics = {
            "features": SimpleNamespace(statistic=-9.0, anomaly_share=0.0, open=True, tested=True)
        }

    def observe(self, topic, p_values, rows, now_ms):
        self.calls += 1
        return [Transition(topic, "open", "drift-1", INCIDENT)] if self.calls == 1 else []

    def moved_features(self, state):
        return []

    def summary(self):
        return {}


def outcome() -> BatchOutcome:
    scores = BatchScores(
        scores=np.zeros(2, np.float32),
        p_values=np.full(2, 0.5, np.float32),
        is_anomaly=np.zeros(2, bool),
        explained=np.empty(0, np.int64),
        top_index=np.empty((0, 1), np.int64),
        top_contribution=np.empty((0, 1), np.float32),
        top_expected=np.empty((0, 1), np.float32),
    )
    return BatchOutcome(
        records=[],
        events=[],
        dlq=[],
        offsets={},
        rows=2,
        scored=Scored(np.zeros((2, 3), np.float32), scores),
    )


def worker(tmp_path) -> Worker:
    w = Worker(WorkerSettings(model_dir=tmp_path, metrics_port=0, input_topic="features"))
    w.drift = OneTransition()
    w.scorer = SimpleNamespace(device=torch.device("cpu"))
    w.delivery = SimpleNamespace(abandon=lambda producer: [])
    w.clients = SimpleNamespace(
        producer=None, consumer=SimpleNamespace(assignment=set, seek=None, highwater=None)
    )
    w.request_stop()  # the rewind's pause returns at once
    return w


def test_an_incident_in_a_rewound_batch_goes_out_with_the_next_one(tmp_path):
    w = worker(tmp_path)
    first = outcome()
    w._observe(first)
    assert first.incidents == [INCIDENT] and first.scored is None
    w._rewind(KafkaTimeoutError("no ack"), unsent=[])
    second = outcome()
    w._observe(second)
    assert second.incidents == [INCIDENT]
    assert [o for o, _ in w._drift_in_flight] == [second]
    w._count(second, publish_s=0.0)  # delivered
    assert w._drift_in_flight == []
    third = outcome()
    w._observe(third)
    assert third.incidents == []


def test_incidents_off_still_watches_drift_and_publishes_nothing(tmp_path):
    w = worker(tmp_path)
    w.settings = w.settings.model_copy(update={"incident_topic": "none"})
    first = outcome()
    w._observe(first)
    assert first.incidents == [] and w.drift.calls == 1
    assert (
        w.metrics.registry.get_sample_value(
            "cae_drift_incidents_total", {"topic": "features", "status": "open"}
        )
        == 1
    )
