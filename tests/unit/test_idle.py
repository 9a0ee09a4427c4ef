"""When a bounded worker (WORKER_IDLE_TIMEOUT_S) counts as idle: only while it holds
partitions, never while its group is joining or rebalancing.

Pure logic: the run bounds with a fake clock, fed by the worker's rebalance listener
through a stand-in consumer that only reports an assignment (no broker, no model)."""

from __future__ import annotations

from kafka import TopicPartition

from worker.bounds import RunBounds
from worker.service import RebalanceListener

TIMEOUT_S = 8.0


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Consumer:
    """Lists its partitions like kafka-python: revoked ones stay until the next assignment."""

    def __init__(self, partitions=()):
        self.partitions = set(partitions)

    def assignment(self):
        return set(self.partitions)


class Worker:
    """The two public methods the listener calls, feeding the real RunBounds."""

    def __init__(self, bounds: RunBounds):
        self.bounds = bounds
        self.flushed: list[str] = []

    def flush(self, reason: str) -> None:
        self.flushed.append(reason)

    def partitions_changed(self, held: set, assigned: set | None = None) -> None:
        self.bounds.held(len(held), assigned=assigned is not None)


def bounded(consumer: Consumer) -> tuple[RunBounds, RebalanceListener, Clock]:
    clock = Clock()
    bounds = RunBounds(max_records=None, idle_timeout_s=TIMEOUT_S, clock=clock)
    listener = RebalanceListener(consumer.assignment, Worker(bounds))
    listener.on_partitions_assigned(consumer.assignment())  # what the group gave
    return bounds, listener, clock


def test_idle_only_after_the_timeout_with_partitions_held():
    bounds, _, clock = bounded(Consumer({TopicPartition("t", 0)}))
    assert not bounds.done(0, 0)
    clock.now += TIMEOUT_S + 1
    assert bounds.done(0, 0)


def test_arrivals_restart_the_clock():
    bounds, _, clock = bounded(Consumer({TopicPartition("t", 0)}))
    clock.now += TIMEOUT_S - 1
    bounds.arrived()
    clock.now += TIMEOUT_S - 1
    assert not bounds.done(5, 0)


def test_not_idle_while_joining_with_no_partitions():
    bounds, _, clock = bounded(Consumer())
    clock.now += TIMEOUT_S * 10
    assert not bounds.done(0, 0)


def test_not_idle_while_rebalancing_even_though_revoked_partitions_are_still_listed():
    consumer = Consumer({TopicPartition("t", 0), TopicPartition("t", 1)})
    bounds, listener, clock = bounded(consumer)
    listener.on_partitions_revoked(consumer.assignment())
    assert listener.worker.flushed == ["revoked"], "the batch in hand goes before the partitions"
    clock.now += TIMEOUT_S * 10  # a rejoin waiting out a dead member's session
    assert not bounds.done(0, 0)
    consumer.partitions = {TopicPartition("t", 0)}
    listener.on_partitions_assigned({TopicPartition("t", 0)})
    assert not bounds.done(0, 0), "the clock restarts at the assignment"
    clock.now += TIMEOUT_S + 1
    assert bounds.done(0, 0)


def test_a_batch_in_hand_is_never_idle():
    bounds, _, clock = bounded(Consumer({TopicPartition("t", 0)}))
    clock.now += TIMEOUT_S + 1
    assert not bounds.done(0, in_hand=1)


def test_max_records_bounds_the_run_and_what_may_be_polled():
    bounds = RunBounds(max_records=100, idle_timeout_s=None)
    assert bounds.room(done=60, in_hand=30) == 10
    assert not bounds.done(99, 0)
    assert bounds.done(100, 0)
    assert RunBounds(None, None).room(5, 5) is None
