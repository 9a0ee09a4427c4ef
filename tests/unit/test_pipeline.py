"""The pipelined at-least-once commit rule, with fake futures and a fake consumer:
commit in order, only acknowledged batches, never past an unfinished or failed one."""

from __future__ import annotations

from collections import namedtuple

import pytest
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import TopicPartition
from structlog.testing import capture_logs

from worker.clients import unknown_leaders
from worker.delivery import AtLeastOnce, Changelog, ExactlyOnce
from worker.incident_records import MARKER_KEY
from worker.pipeline import Pipeline, Settled, merge_offsets
from worker.settings import WorkerSettings
from worker.step import BatchOutcome, first_offsets, next_offsets

Record = namedtuple("Record", "topic partition offset")
TP0, TP1 = TopicPartition("in", 0), TopicPartition("in", 1)


class FakeFuture:
    def __init__(self):
        self.is_done, self.exception = False, None

    def ack(self):
        self.is_done = True

    def fail(self, error="injected"):
        self.is_done, self.exception = True, KafkaError(error)

    def succeeded(self):
        return self.is_done and self.exception is None

    def get(self, timeout=None):
        if not self.is_done:
            raise KafkaTimeoutError("fake: not done")
        if self.exception:
            raise self.exception


def batch(partition_offsets: dict[int, range]) -> BatchOutcome:
    records = [Record("in", p, o) for p, offs in partition_offsets.items() for o in offs]
    return BatchOutcome(records=records, events=[], dlq=[], offsets=next_offsets(records))


def futures(n: int) -> list[FakeFuture]:
    return [FakeFuture() for _ in range(n)]


def committed_to(offsets) -> dict:
    return {tp: om.offset for tp, om in offsets.items()}


def test_acknowledged_batches_leave_in_order_and_stop_at_the_first_unfinished():
    p = Pipeline(depth=4)
    fs = [futures(2), futures(2), futures(2)]
    outcomes = [batch({0: range(i * 10, i * 10 + 10)}) for i in range(3)]
    for o, f in zip(outcomes, fs, strict=True):
        p.add(o, f)
    assert p.records == 30
    for f in fs[1] + fs[2]:  # later batches done first
        f.ack()
    assert p.take_acknowledged().finished == [], "nothing behind an unfinished head"
    fs[0][0].ack()
    assert p.take_acknowledged().finished == []
    fs[0][1].ack()
    settled = p.take_acknowledged()
    assert [f.outcome for f in settled.finished] == outcomes and settled.error is None
    assert len(p) == 0 and p.records == 0


def test_a_failed_batch_is_never_passed_and_abandon_returns_everything_behind_it():
    p = Pipeline(depth=4)
    fs = [futures(1), futures(3), futures(1)]
    outcomes = [
        batch({0: range(0, 5)}),
        batch({0: range(5, 9), 1: range(0, 2)}),
        batch({1: range(2, 4)}),
    ]
    for o, f in zip(outcomes, fs, strict=True):
        p.add(o, f)
    fs[0][0].ack()
    fs[1][0].ack()
    fs[1][1].fail("broker refused")
    fs[1][2].ack()
    fs[2][0].ack()
    settled = p.take_acknowledged()
    assert [f.outcome for f in settled.finished] == outcomes[:1]
    assert "1 of 3 outputs not acknowledged" in str(settled.error)
    assert p.take_acknowledged().finished == [], "the failed batch stays at the head"
    dropped = p.abandon()
    assert first_offsets(dropped.records) == {TP0: 5, TP1: 0}
    assert len(p) == 0 and p.records == 0


def test_a_batch_without_outputs_is_acknowledged_at_once():
    p = Pipeline(depth=2)
    p.add(batch({0: range(3)}), [])
    assert len(p.take_acknowledged().finished) == 1


def test_merge_offsets_takes_the_newest_per_partition():
    merged = merge_offsets([batch({0: range(0, 5), 1: range(0, 2)}), batch({0: range(5, 7)})])
    assert committed_to(merged) == {TP0: 7, TP1: 2}


# -- AtLeastOnce over the pipeline: what is committed, how --------------------------------


class FakeProducer:
    def __init__(self):
        self.sent: list[FakeFuture] = []
        self.records: list[tuple] = []  # (topic, partition, key, value) of every send
        self.flushed = 0

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        f = FakeFuture()
        self.sent.append(f)
        self.records.append((topic, partition, key, value))
        if hasattr(self, "calls") and topic == "incidents.state":
            self.calls.append(f"state {partition} {key!r}")
        return f

    def partitions_for(self, topic):
        return {0}

    def flush(self, timeout=None):
        self.flushed += 1
        for f in self.sent:
            if not f.is_done:
                f.ack()


class FakeConsumer:
    def __init__(self):
        self.async_commits: list[dict] = []
        self.sync_commits: list[dict] = []

    def commit_async(self, offsets, callback=None):
        self.async_commits.append(committed_to(offsets))

    def commit(self, offsets):
        self.sync_commits.append(committed_to(offsets))

    def assignment(self):
        return {TP0, TP1}


def with_outputs(outcome: BatchOutcome, n: int) -> BatchOutcome:
    outcome.events = [(None, b"e", [])] * n
    return outcome


def at_least_once(depth=4) -> AtLeastOnce:
    return AtLeastOnce(WorkerSettings(metrics_port=0), depth=depth)


def test_commits_are_async_in_order_and_only_for_acknowledged_batches():
    d, producer, consumer = at_least_once(), FakeProducer(), FakeConsumer()
    d.submit(with_outputs(batch({0: range(0, 10)}), 2), producer, consumer)
    d.submit(with_outputs(batch({0: range(10, 20), 1: range(0, 5)}), 2), producer, consumer)
    assert d.in_flight() == 25
    producer.sent[2].ack()
    producer.sent[3].ack()
    d.settle(producer, consumer)
    assert consumer.async_commits == [], "the second batch waits for the first"
    producer.sent[0].ack()
    producer.sent[1].ack()
    settled = d.settle(producer, consumer)
    assert len(settled.finished) == 2
    assert consumer.async_commits == [{TP0: 20, TP1: 5}] and consumer.sync_commits == []
    assert d.in_flight() == 0


def test_a_failure_commits_nothing_past_it_and_a_drain_commits_synchronously():
    d, producer, consumer = at_least_once(), FakeProducer(), FakeConsumer()
    for i in range(3):
        d.submit(with_outputs(batch({0: range(i * 10, i * 10 + 10)}), 1), producer, consumer)
    producer.sent[0].ack()
    producer.sent[1].fail()
    producer.sent[2].ack()
    settled = d.settle(producer, consumer)
    assert settled.error is not None and len(settled.finished) == 1
    assert consumer.async_commits == [{TP0: 10}]
    assert first_offsets(d.abandon(producer).records) == {TP0: 10}, "rewind to the failed batch"
    d.submit(with_outputs(batch({0: range(10, 30)}), 1), producer, consumer)
    settled = d.settle(producer, consumer, wait="all")
    assert producer.flushed == 1 and settled.error is None
    assert consumer.sync_commits == [{TP0: 30}], "the drain commits all acknowledged since"


def test_a_full_pipeline_waits_for_its_head_and_fails_it_when_it_never_finishes():
    d, producer, consumer = at_least_once(depth=2), FakeProducer(), FakeConsumer()
    d.submit(with_outputs(batch({0: range(0, 10)}), 1), producer, consumer)
    assert d.settle(producer, consumer, wait="room").error is None, "room left"
    d.submit(with_outputs(batch({0: range(10, 20)}), 1), producer, consumer)
    settled = d.settle(producer, consumer, wait="room")
    assert "not acknowledged" in str(settled.error), "an unfinished head on a full pipeline"
    assert consumer.async_commits == []


def test_a_batch_unacknowledged_for_30_s_fails_even_with_room_left():
    d, producer, consumer = at_least_once(), FakeProducer(), FakeConsumer()
    clock = Clock()
    d.pipeline.clock = clock
    d.submit(with_outputs(batch({0: range(0, 10)}), 1), producer, consumer)
    clock.t += 29
    assert d.settle(producer, consumer).error is None
    clock.t += 2
    assert "not acknowledged in 30s" in str(d.settle(producer, consumer).error)
    assert consumer.async_commits == []


# -- ExactlyOnce: one transaction per commit interval --------------------------------------


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class TxProducer(FakeProducer):
    def __init__(self, fail_commit=False):
        super().__init__()
        self.calls: list[str] = []
        self.fail_commit = fail_commit

    def begin_transaction(self):
        self.calls.append("begin")

    def send_offsets_to_transaction(self, offsets, group):
        self.calls.append(f"offsets {committed_to(offsets)}")

    def commit_transaction(self):
        if self.fail_commit:
            raise KafkaError("injected: commit failed")
        self.flush()
        self.calls.append("commit")

    def abort_transaction(self):
        self.calls.append("abort")


class GroupConsumer(FakeConsumer):
    def group_metadata(self):
        return "group"


def exactly_once(clock, **kw) -> ExactlyOnce:
    settings = WorkerSettings(metrics_port=0, commit_interval_ms=100, max_batch_size=10, **kw)
    return ExactlyOnce(settings, depth=4, clock=clock)


def test_one_transaction_spans_the_batches_of_an_interval():
    clock, producer, consumer = Clock(), TxProducer(), GroupConsumer()
    d = exactly_once(clock)
    d.submit(with_outputs(batch({0: range(0, 5)}), 1), producer, consumer)
    clock.t += 0.05
    assert d.settle(producer, consumer).finished == []
    d.submit(with_outputs(batch({0: range(5, 9), 1: range(0, 3)}), 1), producer, consumer)
    assert d.due_in_s() == pytest.approx(0.05)
    clock.t += 0.05
    settled = d.settle(producer, consumer)
    assert len(settled.finished) == 2
    assert producer.calls == ["begin", f"offsets { {TP0: 9, TP1: 3} }", "commit"]
    assert d.in_flight() == 0 and d.due_in_s() is None


def test_a_transaction_closes_early_when_it_holds_enough_records():
    clock, producer, consumer = Clock(), TxProducer(), GroupConsumer()
    d = exactly_once(clock)  # at most 4 × 10 records
    for i in range(4):
        d.submit(with_outputs(batch({0: range(i * 10, i * 10 + 10)}), 1), producer, consumer)
    assert len(d.settle(producer, consumer, wait="room").finished) == 4


def test_a_failed_transaction_is_aborted_and_hands_back_all_its_records():
    clock, producer, consumer = Clock(), TxProducer(fail_commit=True), GroupConsumer()
    d = exactly_once(clock)
    d.submit(with_outputs(batch({0: range(0, 5)}), 1), producer, consumer)
    d.submit(with_outputs(batch({0: range(5, 9)}), 1), producer, consumer)
    settled = d.settle(producer, consumer, wait="all")
    assert settled.error is not None and settled.finished == []
    assert producer.calls[-1] == "abort"
    assert first_offsets(d.abandon(producer).records) == {TP0: 0}
    assert producer.calls.count("abort") == 1


class CommitResult:
    """kafka-python's TransactionalRequestResult: done when the broker has answered."""

    def __init__(self, producer: AsyncTxProducer):
        self.producer, self.is_done, self.error = producer, False, None

    def end(self, error: Exception | None = None):
        self.producer.flush()
        self.producer.calls.append("commit ended")
        self.is_done, self.error = True, error

    def wait(self, timeout_ms=None) -> bool:
        if not self.is_done and self.producer.stalled_waits:  # the timeout passed
            self.producer.stalled_waits -= 1
            return False
        if not self.is_done:  # the real one blocks until the sender thread ends it
            self.end(KafkaError("injected: commit failed") if self.producer.fail_commit else None)
        if self.error:
            raise self.error
        return True


class TransactionManager:
    """The parts of kafka-python's producer._transaction_manager the worker uses: each
    queues its requests for the sender thread and returns at once."""

    def __init__(self, producer: AsyncTxProducer):
        self.producer = producer

    def send_offsets_to_transaction(self, offsets, group):
        self.producer.calls.append(f"offsets queued {committed_to(offsets)}")
        return CommitResult(self.producer)

    def begin_commit(self):
        self.producer.calls.append("commit started")
        self.producer.result = CommitResult(self.producer)
        return self.producer.result


class AsyncTxProducer(TxProducer):
    """send_offsets_to_transaction() and commit_transaction() in the parts kafka-python's
    KafkaProducer has: the transaction manager queues them, the sender thread ends them
    later; the blocking calls themselves must not be used."""

    def __init__(self, fail_commit=False):
        super().__init__(fail_commit)
        self._transaction_manager = TransactionManager(self)
        self._sender = self
        self.result: CommitResult | None = None
        self.stalled_waits = 0  # waits of the commit that time out before it ends

    def send_offsets_to_transaction(self, offsets, group):
        raise AssertionError("blocks the loop")

    def commit_transaction(self):
        raise AssertionError("blocks the loop")

    def wakeup(self):
        pass


def started_commit(clock, producer, consumer, **kw) -> ExactlyOnce:
    """A transaction of one batch (partition 0, offsets 0-4) whose commit is in flight."""
    d = exactly_once(clock, **kw)
    d.submit(with_outputs(batch({0: range(0, 5)}), 1), producer, consumer)
    clock.t += 0.1
    assert d.settle(producer, consumer) == Settled()  # started, not waited for
    return d


def test_the_loop_goes_on_while_the_offsets_and_the_commit_are_in_flight():
    clock, producer, consumer = Clock(), AsyncTxProducer(), GroupConsumer()
    d = started_commit(clock, producer, consumer)
    assert producer.calls == ["begin", f"offsets queued { {TP0: 5} }", "commit started"]
    assert d.in_flight() == 5 and d.due_in_s() == 0.0  # uncommitted until it ends
    assert d.settle(producer, consumer) == Settled()  # not done yet: nothing to wait for
    # the next batch is scored meanwhile, and waits: nothing of it is sent
    d.submit(with_outputs(batch({0: range(5, 9)}), 2), producer, consumer)
    assert d.settle(producer, consumer, wait="room") == Settled(), "room for more"
    assert len(producer.sent) == 1 and producer.calls[-1] == "commit started"
    assert d.in_flight() == 9
    producer.result.end()
    assert len(d.settle(producer, consumer).finished) == 1
    assert producer.calls[-2:] == ["commit ended", "begin"], "the next begins after"
    assert len(producer.sent) == 3 and d.in_flight() == 4
    assert d.due_in_s() == pytest.approx(0.1)


def test_a_transaction_s_interval_starts_when_its_first_batch_was_scored():
    """A batch that waited for the previous commit has waited that long: the next
    transaction is due one interval after it was scored, not after the commit ended."""
    clock, producer, consumer = Clock(), AsyncTxProducer(), GroupConsumer()
    d = started_commit(clock, producer, consumer)
    d.submit(with_outputs(batch({0: range(5, 9)}), 1), producer, consumer)  # waits
    clock.t += 0.06  # the commit takes 60 ms
    producer.result.end()
    assert len(d.settle(producer, consumer).finished) == 1
    assert producer.calls[-2:] == ["commit ended", "begin"]
    assert d.due_in_s() == pytest.approx(0.04)
    clock.t += 0.04
    d.settle(producer, consumer)
    assert producer.calls[-2:] == [f"offsets queued { {TP0: 9} }", "commit started"]


def test_batches_scored_during_the_commit_wait_for_it_once_they_fill_a_transaction():
    clock, producer, consumer = Clock(), AsyncTxProducer(), GroupConsumer()
    d = started_commit(clock, producer, consumer)  # at most 4 × 10 records
    for i in range(4):
        d.submit(with_outputs(batch({0: range(5 + i * 10, 15 + i * 10)}), 1), producer, consumer)
        if i < 3:
            assert d.settle(producer, consumer, wait="room") == Settled()
    assert producer.result.is_done is False and len(producer.sent) == 1
    settled = d.settle(producer, consumer, wait="room")  # a fifth would not fit: wait
    assert len(settled.finished) == 1 and settled.error is None
    assert len(producer.sent) == 5 and d.in_flight() == 40
    # the next transaction is full at once: its commit starts too
    assert producer.calls[-4:] == [
        "commit ended",
        "begin",
        f"offsets queued { {TP0: 45} }",
        "commit started",
    ]


def test_a_drain_during_the_commit_commits_it_and_then_what_waited():
    clock, producer, consumer = Clock(), AsyncTxProducer(), GroupConsumer()
    d = started_commit(clock, producer, consumer)
    d.submit(with_outputs(batch({0: range(5, 9)}), 1), producer, consumer)
    settled = d.settle(producer, consumer, wait="all")
    assert len(settled.finished) == 2 and settled.error is None
    assert producer.calls == [
        "begin",
        f"offsets queued { {TP0: 5} }",
        "commit started",
        "commit ended",
        "begin",
        f"offsets queued { {TP0: 9} }",
        "commit started",
        "commit ended",
    ]
    assert d.in_flight() == 0 and d.due_in_s() is None


def test_a_commit_that_fails_in_flight_is_aborted_and_hands_back_its_records():
    clock, producer, consumer = Clock(), AsyncTxProducer(fail_commit=True), GroupConsumer()
    d = started_commit(clock, producer, consumer)
    d.submit(with_outputs(batch({0: range(5, 9)}), 1), producer, consumer)
    settled = d.settle(producer, consumer, wait="all")
    assert "commit failed" in str(settled.error) and settled.finished == []
    assert producer.calls[-1] == "abort" and producer.calls.count("begin") == 1
    assert len(producer.sent) == 1, "what waited was never sent"
    abandoned = d.abandon(producer)
    assert [r.offset for r in abandoned.records] == list(range(9)), "both, oldest first"
    assert producer.calls.count("abort") == 1


def test_a_batch_that_waited_and_cannot_be_sent_is_handed_back_with_those_behind_it():
    clock, producer, consumer = Clock(), AsyncTxProducer(), GroupConsumer()
    d = started_commit(clock, producer, consumer)
    d.submit(with_outputs(batch({0: range(5, 9)}), 1), producer, consumer)
    d.submit(with_outputs(batch({0: range(9, 12)}), 1), producer, consumer)
    producer.result.end()
    producer.send = lambda *a, **kw: (_ for _ in ()).throw(KafkaError("injected: send"))
    settled = d.settle(producer, consumer)
    assert len(settled.finished) == 1, "the commit itself succeeded"
    assert "injected: send" in str(settled.error) and producer.calls[-1] == "abort"
    assert [r.offset for r in d.abandon(producer).records] == list(range(5, 12))


def test_abandon_during_a_commit_that_succeeds_hands_back_none_of_its_records():
    """Records whose transaction committed must not be read and published again."""
    clock, producer, consumer = Clock(), AsyncTxProducer(), GroupConsumer()
    d = started_commit(clock, producer, consumer)
    d.submit(with_outputs(batch({0: range(5, 9)}), 1), producer, consumer)
    assert first_offsets(d.abandon(producer).records) == {TP0: 5}, "only what waited"
    assert "abort" not in producer.calls
    assert len(d.settle(producer, consumer).finished) == 1  # still counted
    assert d.in_flight() == 0


def test_a_commit_that_waits_says_so_every_few_seconds_and_on_what():
    """A stalled first transaction is in the logs within seconds, not after 120 s."""
    clock, producer, consumer = Clock(), AsyncTxProducer(), GroupConsumer()
    d = started_commit(clock, producer, consumer)
    producer.stalled_waits = 2
    with capture_logs() as logs:
        settled = d.settle(producer, consumer, wait="all")
    assert len(settled.finished) == 1 and settled.error is None
    waiting = [e for e in logs if e["event"] == "commit_waiting"]
    assert len(waiting) == 2 and all(e["log_level"] == "warning" for e in waiting)
    assert waiting[0]["unacknowledged"] == 1 and waiting[0]["leader_unknown"] == []


def test_unknown_leaders_names_the_partitions_the_producer_has_no_leader_for():
    from kafka.cluster import ClusterMetadata
    from kafka.producer.future import FutureProduceResult, FutureRecordMetadata

    def sent(topic: str) -> FutureRecordMetadata:
        return FutureRecordMetadata(
            FutureProduceResult(TopicPartition(topic, 0)), 0, 0, None, 1, 1, -1
        )

    class Producer:
        _metadata = ClusterMetadata()  # knows no topic: every leader unknown

    assert unknown_leaders(Producer(), [sent("events"), sent("state"), sent("events")]) == [
        "events-0",
        "state-0",
    ]
    assert unknown_leaders(object(), [sent("events")]) == [], "a client without the parts"


def test_without_the_transaction_managers_parts_the_commit_blocks():
    """A kafka-python whose producer lacks the private parts: the public calls."""
    clock, producer, consumer = Clock(), TxProducer(), GroupConsumer()
    producer._transaction_manager = object()  # no send_offsets_to_transaction, begin_commit
    producer._sender = producer
    d = exactly_once(clock)
    d.submit(with_outputs(batch({0: range(0, 5)}), 1), producer, consumer)
    clock.t += 0.1
    assert len(d.settle(producer, consumer).finished) == 1, "committed before it returned"
    assert producer.calls == ["begin", f"offsets { {TP0: 5} }", "commit"]


def test_the_installed_kafka_python_has_the_parts_the_overlapped_commit_uses():
    """Else every exactly-once commit blocks the loop (the fallback above)."""
    from kafka.producer.kafka import KafkaProducer
    from kafka.producer.transaction_manager import TransactionManager as Manager

    assert callable(Manager.send_offsets_to_transaction) and callable(Manager.begin_commit)
    names = KafkaProducer.__init__.__code__.co_names  # what the constructor assigns
    assert "_transaction_manager" in names and "_sender" in names


def test_the_installed_kafka_python_has_the_parts_topic_tracking_and_the_wait_log_use():
    """Else the worker's sends do not track their topics (worker.clients.track_topic)
    and a waiting commit cannot name its partitions: the stall is back, silently."""
    from kafka.cluster import ClusterMetadata
    from kafka.producer.future import FutureProduceResult
    from kafka.producer.kafka import KafkaProducer
    from kafka.producer.sender import Sender
    from kafka.producer.transaction_manager import TransactionalRequestResult

    assert callable(Sender.add_topic) and callable(ClusterMetadata.leader_for_partition)
    assert "_metadata" in KafkaProducer.__init__.__code__.co_names
    assert "topic_partition" in FutureProduceResult.__slots__
    assert TransactionalRequestResult().wait(timeout_ms=1) is False, "a wait that times out"


def test_a_drift_incident_of_an_abandoned_batch_is_carried():
    d, producer, consumer = at_least_once(), FakeProducer(), FakeConsumer()
    drift = (b"drift/in", b"{}", [])
    outcome = with_outputs(batch({0: range(0, 3)}), 1)
    outcome.drift = [drift]
    d.submit(outcome, producer, consumer)
    assert len(producer.sent) == 2, "an event and the drift incident"
    producer.sent[0].fail()
    assert d.settle(producer, consumer).error is not None
    abandoned = d.abandon(producer)
    assert abandoned.carried == [drift] and len(abandoned.records) == 3


# -- the incident state's changelog records, held back and sent coalesced ----------------


def with_state(outcome: BatchOutcome, *records) -> BatchOutcome:
    """The batch's changelog records: (partition, key, value); b"m" is a marker."""
    outcome.state = list(records)
    return outcome


def state_sent(producer) -> list[tuple]:
    return [(p, k, v) for t, p, k, v in producer.records if t == "incidents.state"]


def test_the_changelog_keeps_the_newest_value_per_key_and_sends_the_markers_last():
    log, producer = Changelog(), FakeProducer()
    log.add([(0, b"ka", b"1"), (0, MARKER_KEY, b"m1"), (1, b"ka", b"x")])
    log.add([(0, b"kb", b"1"), (0, b"ka", None), (0, MARKER_KEY, b"m2")])
    log.add([(0, b"kb", b"2"), (1, MARKER_KEY, b"n1")])
    assert len(log.flush(producer, "incidents.state")) == 5
    assert state_sent(producer) == [
        (0, b"ka", None),  # a tombstone is a value like any other: the newest wins
        (1, b"ka", b"x"),
        (0, b"kb", b"2"),
        (0, MARKER_KEY, b"m2"),
        (1, MARKER_KEY, b"n1"),
    ]
    assert len(log) == 0 and log.flush(producer, "incidents.state") == []


def test_at_least_once_holds_the_state_back_and_commits_nothing_before_it_is_acknowledged():
    d, producer, consumer = at_least_once(), FakeProducer(), FakeConsumer()  # depth 4
    d.pipeline.clock = Clock()
    first = with_state(
        with_outputs(batch({0: range(0, 10)}), 1),
        (0, b"ka", b"0"),
        (0, b"kb", b"0"),
        (0, MARKER_KEY, b"m0"),
    )
    d.submit(first, producer, consumer)
    producer.sent[-1].ack()
    assert d.settle(producer, consumer).finished == [], "its state is not out yet"
    assert state_sent(producer) == [], "held back until a second batch"
    second = with_state(
        with_outputs(batch({0: range(10, 20)}), 1), (0, b"ka", b"1"), (0, MARKER_KEY, b"m1")
    )
    d.submit(second, producer, consumer)
    assert state_sent(producer) == []
    d.settle(producer, consumer)  # the next loop turn: two batches held back, flushed
    # both batches' state: one record per key, then the marker
    assert state_sent(producer) == [(0, b"ka", b"1"), (0, b"kb", b"0"), (0, MARKER_KEY, b"m1")]
    for f in producer.sent[:-3]:  # every event, not the state records
        f.ack()
    assert d.settle(producer, consumer).finished == [] and consumer.async_commits == []
    for f in producer.sent:
        f.ack()
    assert len(d.settle(producer, consumer).finished) == 2
    assert consumer.async_commits == [{TP0: 20}]


def test_at_least_once_flushes_the_state_after_the_commit_interval_and_on_a_drain():
    d, producer, consumer = at_least_once(), FakeProducer(), FakeConsumer()
    clock = d.pipeline.clock = Clock()
    d.submit(with_state(batch({0: range(0, 10)}), (0, b"ka", b"1")), producer, consumer)
    clock.t += 0.099
    d.settle(producer, consumer)
    assert state_sent(producer) == []
    clock.t += 0.001  # WORKER_COMMIT_INTERVAL_MS: 100
    d.settle(producer, consumer)
    assert state_sent(producer) == [(0, b"ka", b"1")]
    d.submit(with_state(batch({0: range(10, 20)}), (0, b"kb", b"1")), producer, consumer)
    settled = d.settle(producer, consumer, wait="all")
    assert state_sent(producer)[-1] == (0, b"kb", b"1") and len(settled.finished) == 2
    assert consumer.async_commits == [] and consumer.sync_commits == [{TP0: 20}]


def test_a_failure_drops_the_state_held_back_with_the_batches_it_hands_back():
    d, producer, consumer = at_least_once(), FakeProducer(), FakeConsumer()
    d.submit(
        with_state(with_outputs(batch({0: range(0, 10)}), 1), (0, b"ka", b"old")),
        producer,
        consumer,
    )
    producer.sent[0].fail()
    assert d.settle(producer, consumer).error is not None
    assert first_offsets(d.abandon(producer).records) == {TP0: 0}
    d.submit(with_state(batch({0: range(0, 10)}), (0, b"kb", b"new")), producer, consumer)
    d.settle(producer, consumer, wait="all")
    assert state_sent(producer) == [(0, b"kb", b"new")], "the abandoned batch's state is gone"


def test_without_state_records_a_batch_is_not_held_back():
    d, producer, consumer = at_least_once(), FakeProducer(), FakeConsumer()
    d.submit(with_outputs(batch({0: range(0, 10)}), 1), producer, consumer)
    producer.sent[0].ack()
    assert len(d.settle(producer, consumer).finished) == 1
    assert consumer.async_commits == [{TP0: 10}]


def test_a_transaction_sends_each_batch_s_state_with_it_before_its_commit():
    """Under exactly-once nothing is held back: the state would otherwise be produced
    while the transaction ends, a round trip more before a reader sees it."""
    clock, producer, consumer = Clock(), TxProducer(), GroupConsumer()
    d = exactly_once(clock)
    d.submit(
        with_state(batch({0: range(0, 5)}), (0, b"ka", b"1"), (0, MARKER_KEY, b"m1")),
        producer,
        consumer,
    )
    assert state_sent(producer) == [(0, b"ka", b"1"), (0, MARKER_KEY, b"m1")]
    d.submit(
        with_state(batch({0: range(5, 9)}), (0, b"ka", b"2"), (0, MARKER_KEY, b"m2")),
        producer,
        consumer,
    )
    clock.t += 0.1
    assert len(d.settle(producer, consumer).finished) == 2
    assert producer.calls == [
        "begin",
        "state 0 b'ka'",
        "state 0 b'm'",
        "state 0 b'ka'",
        "state 0 b'm'",
        f"offsets { {TP0: 9} }",
        "commit",
    ]
