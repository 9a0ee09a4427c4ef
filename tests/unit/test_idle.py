"""When a bounded worker (WORKER_IDLE_TIMEOUT_S) counts as idle: only while it holds
partitions, never while its group is joining or rebalancing.

Pure logic: the Worker's idle rule and its rebalance listener, with a stand-in
consumer that only reports an assignment (no broker, no model)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from kafka import TopicPartition

from worker.batcher import MicroBatcher
from worker.metrics import WorkerMetrics
from worker.service import RunSummary, Worker, _FlushOnRevoke

TIMEOUT_S = 8.0


class Consumer:
    def __init__(self, partitions=()):
        self.partitions = set(partitions)

    def assignment(self):
        return set(self.partitions)


def worker(consumer) -> Worker:
    w = object.__new__(Worker)  # the idle rule only; nothing to load or connect
    w.settings = SimpleNamespace(max_records=None, idle_timeout_s=TIMEOUT_S)
    w.batcher = MicroBatcher(max_size=10, max_wait_s=1.0)
    w.summary = RunSummary()
    w.metrics = WorkerMetrics()
    w.consumer = consumer
    w.partitions_held = 0
    w.flush = lambda reason: None
    _FlushOnRevoke(w).on_partitions_assigned(consumer.assignment())  # what the group gave
    return w


def quiet_for(w: Worker, seconds: float) -> None:
    w._last_records_at = time.monotonic() - seconds


def test_idle_only_after_the_timeout_with_partitions_held():
    w = worker(Consumer({TopicPartition("t", 0)}))
    assert not w._bounded_done()
    quiet_for(w, TIMEOUT_S + 1)
    assert w._bounded_done()


def test_not_idle_while_joining_with_no_partitions():
    w = worker(Consumer())
    quiet_for(w, TIMEOUT_S * 10)
    assert not w._bounded_done()
    w.consumer = None  # not connected yet
    assert not w._bounded_done()


def test_not_idle_while_rebalancing_even_though_revoked_partitions_are_still_listed():
    consumer = Consumer({TopicPartition("t", 0), TopicPartition("t", 1)})
    w = worker(consumer)
    listener = _FlushOnRevoke(w)
    listener.on_partitions_revoked(consumer.assignment())
    quiet_for(w, TIMEOUT_S * 10)  # a rejoin waiting out a dead member's session
    assert not w._bounded_done()
    listener.on_partitions_assigned({TopicPartition("t", 0)})
    assert not w._bounded_done(), "the clock restarts at the assignment"
    quiet_for(w, TIMEOUT_S + 1)
    assert w._bounded_done()


def test_a_batch_in_hand_is_never_idle():
    w = worker(Consumer({TopicPartition("t", 0)}))
    w.batcher.add(["record"])
    quiet_for(w, TIMEOUT_S + 1)
    assert not w._bounded_done()
