"""A drift incident the monitor announced is published even when its batch is not:
the delivery hands it back with the abandoned batch's records (worker/pipeline.py
`Abandoned`), the rewind carries it to the next batch, and once delivered it is not
carried again. The real Worker and its at-least-once delivery, with stand-ins for the
monitor and the Kafka clients (no broker, no model)."""

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
    w.clients = SimpleNamespace(
        producer=FakeProducer(),
        consumer=SimpleNamespace(
            assignment=set, seek=None, highwater=lambda tp: None, commit_async=print
        ),
    )
    w.request_stop()  # the rewind's pause returns at once
    return w


class FakeProducer:
    """Sends nothing: each output's future is done, acknowledged or failed at will."""

    def __init__(self):
        self.sent: list[tuple[str, bytes | None]] = []
        self.fail = False

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        self.sent.append((topic, key))
        error = KafkaTimeoutError("injected: no ack") if self.fail else None
        return SimpleNamespace(is_done=True, exception=error)

    def partitions_for(self, topic):
        return {0}


def deliver(w: Worker, outcome: BatchOutcome) -> bool:
    """What Worker._process does after scoring: observe, submit, settle."""
    w._observe(outcome)
    w.delivery.submit(outcome, w.clients.producer, w.clients.consumer)
    return w._settle()


def test_an_incident_in_a_rewound_batch_goes_out_with_the_next_one(tmp_path):
    w = worker(tmp_path)
    producer = w.clients.producer
    producer.fail = True
    first = outcome()
    assert not deliver(w, first), "its output failed: rewound"
    assert first.drift == [INCIDENT] and first.scored is None
    assert producer.sent == [("incidents", INCIDENT[0])]
    producer.fail = False
    second = outcome()
    assert deliver(w, second)
    assert second.drift == [INCIDENT], "carried"
    assert producer.sent[1:] == [("incidents", INCIDENT[0])]
    third = outcome()
    assert deliver(w, third)
    assert third.drift == [] and len(producer.sent) == 2, "delivered: not carried again"


def test_an_incident_of_a_batch_never_handed_to_the_delivery_is_carried(tmp_path):
    w = worker(tmp_path)
    first = outcome()
    w._observe(first)
    w._rewind(KafkaTimeoutError("no room"), unsent=first)  # as _process on a failed settle
    second = outcome()
    w._observe(second)
    assert second.drift == [INCIDENT]


def test_incidents_off_still_watches_drift_and_publishes_nothing(tmp_path):
    w = worker(tmp_path)
    w.settings = w.settings.model_copy(update={"incident_topic": "none"})
    first = outcome()
    w._observe(first)
    assert first.drift == [] and w.drift.calls == 1
    assert (
        w.metrics.registry.get_sample_value(
            "cae_drift_incidents_total", {"topic": "features", "status": "open"}
        )
        == 1
    )
