"""Delivery strategies: publish each batch's outputs and commit its offsets, per guarantee.

* **at-least-once** (pipelined): a batch's events and DLQ records are sent and the
  worker goes on to poll and score the next batch while they are in flight (at
  most `PIPELINE_DEPTH` batches). Offsets are committed asynchronously, in order,
  up to the last batch whose every output, and every earlier batch's, was
  acknowledged (`worker/pipeline.py`). A failed output fails its batch: nothing of
  it or of any later batch is committed.
* **exactly-once**: the outputs and offsets of the micro-batches of one commit
  interval (`WORKER_COMMIT_INTERVAL_MS`, at most `PIPELINE_DEPTH` batches' worth of
  records) go in one Kafka transaction; a failure aborts it. The whole end of the
  transaction (its offsets, flushing the outputs, the commit) is queued at once and
  runs while the worker polls and scores the next batches (up to `PIPELINE_DEPTH`
  batches' worth); they wait, unsent, until the commit has ended, so transactions
  never overlap and the next one begins only after this one committed.

Under at-least-once the incident state's changelog records (`Changelog`) are not sent
batch by batch: they are held back and sent coalesced, the newest value per key, every
`PIPELINE_DEPTH` / 2 batches or `WORKER_COMMIT_INTERVAL_MS`, whichever comes first, and
no batch is committed before the records holding its state are acknowledged. A key's
state changes in most batches that read the key, so this writes the same state with
a fraction of the records (docs/benchmarks.md, "The incident changelog coalesced").
Under exactly-once they go with each batch: held to the end of the transaction they
would add a produce round trip to it (kafka-python's sender sends no records while the
transaction's offsets are in flight), and with it to what a `read_committed` reader
waits for.

A failure is reported in `Settled.error`; the worker then calls `abandon`, which
hands back (`Abandoned`) every record not committed, to rewind its consumer to the
first of them (`rewind`) and read and score them again, and the outputs to carry to
the next batch. `settle(wait="all")` drains:
it waits for everything in flight and commits synchronously (rebalance, model
swap, shutdown).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from worker.clients import KeyPartitions, track_topic, unknown_leaders
from worker.incident_records import MARKER_KEY
from worker.pipeline import Abandoned, Finished, Pipeline, PublishError, Settled, merge_offsets
from worker.settings import WorkerSettings
from worker.step import BatchOutcome

log = structlog.get_logger("worker.delivery")

FLUSH_TIMEOUT_S = 30
COMMIT_WAIT_LOG_S = 5  # a commit that waits longer says so, and on what, this often
PIPELINE_DEPTH = 4  # micro-batches in flight (at-least-once) or in one transaction

Wait = Literal["none", "room", "all"]

__all__ = ["Abandoned", "PublishError", "Settled", "delivery_for", "rewind"]


class Delivery(Protocol):
    def producer_options(self) -> dict: ...

    def prepare(self, producer: KafkaProducer) -> None: ...

    def in_flight(self) -> int:
        """Records handed to `submit` and not committed yet."""
        ...

    def due_in_s(self) -> float | None:
        """How soon `settle` may have something to do; None when nothing is in flight."""
        ...

    def submit(
        self, outcome: BatchOutcome, producer: KafkaProducer, consumer: KafkaConsumer
    ) -> None:
        """Send a scored batch's outputs. Raises KafkaError when it cannot be sent."""
        ...

    def settle(self, producer: KafkaProducer, consumer: KafkaConsumer, wait: Wait) -> Settled:
        """Commit what finished. wait="room": first make room for one more batch;
        wait="all": drain everything in flight and commit synchronously."""
        ...

    def abandon(self, producer: KafkaProducer) -> Abandoned:
        """Drop everything not committed; its records, oldest first, and what to carry."""
        ...


class Changelog:
    """The incident state's changelog records held back since the last flush,
    coalesced: per (partition, key) the newest value (a tombstone too) and per partition
    the newest marker. A reader keeps the last value per key (`read_changelog`), so one
    flush writes what the batches' records would have, one record per key. The markers
    go last, so a partition's marker never lands ahead of a state it counts."""

    def __init__(self):
        self._states: dict[tuple[int, bytes], bytes | None] = {}
        self._markers: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._states) + len(self._markers)

    def add(self, records: list[tuple[int, bytes, bytes | None]]) -> None:
        for p, key, value in records:
            if key == MARKER_KEY:
                self._markers[p] = value
            else:
                self._states[(p, key)] = value

    def flush(self, producer: KafkaProducer, topic: str) -> list:
        """Send what is held; their futures."""
        records = [(p, k, v) for (p, k), v in self._states.items()]
        records += [(p, MARKER_KEY, v) for p, v in self._markers.items()]
        futures = _send_state(producer, records, topic)
        self.clear()
        return futures

    def clear(self) -> None:
        self._states, self._markers = {}, {}


class AtLeastOnce:
    def __init__(self, settings: WorkerSettings, depth: int = PIPELINE_DEPTH):
        self.topics = OutputTopics.of(settings)
        self.keyed = KeyPartitions()
        self.pipeline = Pipeline(depth)
        self._uncommitted: dict = {}  # acknowledged offsets not yet committed synchronously
        self.changelog = Changelog()
        # a flush at most every this many batches and this long after the first it holds:
        # half the pipeline, so the head's state has been on its way for a batch or two
        # when a full pipeline waits for it
        self.flush_batches = max(1, depth // 2)
        self.flush_s = settings.commit_interval_ms / 1000

    def producer_options(self) -> dict:
        return {}

    def prepare(self, producer: KafkaProducer) -> None:
        pass

    def in_flight(self) -> int:
        return self.pipeline.records

    def due_in_s(self) -> float | None:
        return 0.0 if len(self.pipeline) else None

    def submit(self, outcome: BatchOutcome, producer, consumer) -> None:
        futures = _send(producer, outcome, self.topics, self.keyed)
        self.changelog.add(outcome.state)
        # a batch without state records while none are held back has nothing to wait for
        self.pipeline.add(outcome, futures, flushed=not len(self.changelog))

    def settle(self, producer, consumer, wait: Wait = "none") -> Settled:
        held, age_s = self.pipeline.unflushed()
        # the held-back batches are the newest; a full pipeline waits for its head
        head_held = self.pipeline.full() and held == len(self.pipeline)
        if held and (
            wait == "all" or head_held or held >= self.flush_batches or age_s >= self.flush_s
        ):
            self.pipeline.flushed(self.changelog.flush(producer, self.topics.state))
        if wait == "all":
            producer.flush(timeout=FLUSH_TIMEOUT_S)  # sends what lingers, waits for every ack
        elif wait == "room" and self.pipeline.full():
            self.pipeline.wait_head(FLUSH_TIMEOUT_S)
        settled = self.pipeline.take_acknowledged()
        stuck = (
            wait == "all"
            or (wait == "room" and self.pipeline.full())
            or self.pipeline.head_age_s() > FLUSH_TIMEOUT_S
        )
        if settled.error is None and stuck and len(self.pipeline):
            settled.error = PublishError(
                f"{self.pipeline.unfinished()} outputs not acknowledged in {FLUSH_TIMEOUT_S}s"
            )
        offsets = merge_offsets([f.outcome for f in settled.finished])
        self._uncommitted.update(offsets)
        if wait == "all":
            self._commit_sync(consumer)
        elif offsets:
            consumer.commit_async(offsets, callback=_log_commit_failure)
        return settled

    def _commit_sync(self, consumer) -> None:
        """Everything acknowledged since the last drain, on partitions still held.
        A failed commit loses no output (the records were delivered); it only means
        they may be read again after a restart or rebalance."""
        assigned = consumer.assignment()
        offsets = {tp: om for tp, om in self._uncommitted.items() if tp in assigned}
        self._uncommitted = {}
        if not offsets:
            return
        try:
            consumer.commit(offsets)
        except KafkaError as e:
            log.warning("commit_failed", error=str(e) or type(e).__name__, sync=True)

    def abandon(self, producer) -> Abandoned:
        self.changelog.clear()  # the tracker rolls back: its records are scored again
        return self.pipeline.abandon()


class ExactlyOnce:
    def __init__(self, settings: WorkerSettings, depth: int = PIPELINE_DEPTH, clock=time.monotonic):
        self.topics = OutputTopics.of(settings)
        self.keyed = KeyPartitions()
        self.interval_s = settings.commit_interval_ms / 1000
        self.batch_size = settings.max_batch_size
        self.max_records = depth * settings.max_batch_size
        self.clock = clock
        # Stable per worker instance, so a restarted worker fences its predecessor.
        self.transactional_id = (
            settings.transactional_id or f"{settings.group_id}-{socket.gethostname()}"
        )
        self._open = False
        self._opened_at = 0.0
        self._batches: list[tuple[BatchOutcome, float]] = []  # in the open transaction
        self._futures: list = []
        self._committing = None  # the end of the transaction in flight: its result, to wait on
        # scored while the commit is in flight (when, by perf_counter and by self.clock);
        # sent in the next transaction once it ended, whose interval starts at the first
        self._waiting: list[tuple[BatchOutcome, float, float]] = []
        self._committed: list[Finished] = []  # committed, not yet reported by settle

    def producer_options(self) -> dict:
        return {"transactional_id": self.transactional_id, "enable_idempotence": True}

    def prepare(self, producer: KafkaProducer) -> None:
        producer.init_transactions()

    def in_flight(self) -> int:
        return sum(len(o.records) for o, *_ in self._batches + self._waiting)

    def due_in_s(self) -> float | None:
        if self._committing is not None or self._committed:
            return 0.0
        if not self._batches:
            return None
        return max(0.0, self._opened_at + self.interval_s - self.clock())

    def submit(self, outcome: BatchOutcome, producer, consumer) -> None:
        if self._committing is not None:  # nothing of it is sent before the commit ended
            self._waiting.append((outcome, time.perf_counter(), self.clock()))
        else:
            self._send(producer, outcome, time.perf_counter())

    def _send(
        self, producer, outcome: BatchOutcome, submitted_at: float, scored_at: float | None = None
    ) -> None:
        """Send a batch in the open transaction (begun here if none is). The interval of a
        transaction starts when its first batch was scored: a batch that waited for the
        previous commit has waited that long already, and its records with it."""
        if not self._open:
            producer.begin_transaction()  # local: no request until the first send
            now = self.clock()
            self._open, self._opened_at = True, now if scored_at is None else min(scored_at, now)
        self._futures += _send(producer, outcome, self.topics, self.keyed)
        self._futures += _send_state(producer, outcome.state, self.topics.state)
        self._batches.append((outcome, submitted_at))

    def _room(self) -> bool:
        """Room to score one more batch while the commit is in flight."""
        waiting = sum(len(o.records) for o, *_ in self._waiting)
        return waiting + self.batch_size <= self.max_records

    def settle(self, producer, consumer, wait: Wait = "none") -> Settled:
        settled = Settled(self._committed)
        self._committed = []
        if self._committing is not None:
            if not self._committing.is_done and (wait == "none" or wait == "room" and self._room()):
                return settled  # the loop polls and scores meanwhile
            ended = self._end_commit(producer)
            settled.finished += ended.finished
            if ended.error is not None:
                settled.error = ended.error
                return settled
            try:
                self._send_waiting(producer)
            except KafkaError as e:
                self._abort(producer)
                settled.error = e
                return settled
        if not self._batches:
            return settled
        due = (
            wait == "all"
            or sum(len(o.records) for o, _ in self._batches) >= self.max_records
            or self.clock() - self._opened_at >= self.interval_s
        )
        if not due:
            return settled
        try:
            # offsets, flush, end of transaction: queued in order, run by the sender thread
            self._committing = _begin_commit(
                producer, merge_offsets([o for o, _ in self._batches]), consumer.group_metadata()
            )
        except (KafkaError, PublishError) as e:
            self._abort(producer)
            settled.error = e
            return settled
        if wait != "all" and not self._committing.is_done:
            return settled  # the loop polls and scores the next batch meanwhile
        ended = self._end_commit(producer)
        settled.finished += ended.finished
        settled.error = ended.error
        return settled

    def _send_waiting(self, producer) -> None:
        waiting, self._waiting = self._waiting, []
        for i, (outcome, submitted_at, scored_at) in enumerate(waiting):
            try:
                self._send(producer, outcome, submitted_at, scored_at)
            except KafkaError:
                self._waiting = waiting[i:]  # unsent (the failed one too): for abandon
                raise

    def _end_commit(self, producer) -> Settled:
        """Wait for the commit in flight; its batches finished, or its error (aborted)."""
        committing, self._committing = self._committing, None
        try:
            self._wait_logging(producer, committing)  # raises the commit's error
            self._open = False
            _check_acknowledged(self._futures)
        except (KafkaError, PublishError) as e:
            self._abort(producer)
            return Settled(error=e)
        now = time.perf_counter()
        finished = [Finished(o, now - t) for o, t in self._batches]
        self._batches, self._futures = [], []
        return Settled(finished)

    def _wait_logging(self, producer, committing) -> None:
        """Wait for the commit, saying every COMMIT_WAIT_LOG_S what it waits for: a stall
        (e.g. outputs whose partition leader the producer does not know) is in the logs
        within seconds, not only when kafka-python expires the outputs (120 s)."""
        started = time.monotonic()
        while not committing.wait(timeout_ms=COMMIT_WAIT_LOG_S * 1000):
            pending = [f for f in self._futures if not f.is_done]
            log.warning(
                "commit_waiting",
                waited_s=round(time.monotonic() - started, 1),
                unacknowledged=len(pending),
                leader_unknown=unknown_leaders(producer, pending),
                action="waits until the outputs are acknowledged or expire "
                "(then aborts and reads the records again)",
            )

    def abandon(self, producer) -> Abandoned:
        if self._committing is not None:  # committed records must not be read again
            self._committed += self._end_commit(producer).finished
        self._abort(producer)
        abandoned = Abandoned.of([o for o, *_ in self._batches + self._waiting])
        self._batches, self._futures, self._waiting = [], [], []
        return abandoned

    def _abort(self, producer) -> None:
        if not self._open:
            return
        self._open = False
        try:
            producer.abort_transaction()
        except Exception as e:
            log.warning("abort_transaction_failed", error=str(e))


class _Committed:
    """The end of a transaction that already happened."""

    is_done = True

    def wait(self, timeout_ms: float | None = None) -> bool:
        return True


def _begin_commit(producer: KafkaProducer, offsets: dict, group_metadata):
    """Queue the end of the open transaction: its consumed offsets (AddOffsetsToTxn,
    TxnOffsetCommit), then the commit (the outputs flushed, EndTxn). Returns what to
    wait on (`is_done`, `wait()` raising the commit's error).

    KafkaProducer.send_offsets_to_transaction() and commit_transaction() each queue
    their requests with the transaction manager, wake the sender thread and wait; this
    queues both and leaves the one wait to the caller. The sender thread sends one
    transactional request at a time, by priority: the offsets' two requests (a failure
    of either puts the manager in an error state) before EndTxn, which it sends only
    once every output is acknowledged and fails if the manager is in an error state, so
    the commit's result covers the offsets too. A client without those parts commits
    here, blocking."""
    manager = getattr(producer, "_transaction_manager", None)
    sender = getattr(producer, "_sender", None)
    if (
        manager is None
        or sender is None
        or not hasattr(manager, "send_offsets_to_transaction")
        or not hasattr(manager, "begin_commit")
    ):
        producer.send_offsets_to_transaction(offsets, group_metadata)
        producer.commit_transaction()
        return _Committed()
    manager.send_offsets_to_transaction(offsets, group_metadata)
    result = manager.begin_commit()
    sender.wakeup()
    return result


def delivery_for(settings: WorkerSettings) -> Delivery:
    return ExactlyOnce(settings) if settings.delivery == "exactly-once" else AtLeastOnce(settings)


def rewind(consumer: KafkaConsumer, firsts: dict[TopicPartition, int]) -> None:
    """Seek each still-assigned partition back to its first uncommitted record."""
    assigned = consumer.assignment()
    for tp, offset in firsts.items():
        if tp in assigned:
            consumer.seek(tp, offset)


@dataclass(frozen=True, slots=True)
class OutputTopics:
    events: str
    dlq: str
    incidents: str
    state: str  # the incident changelog: record i of input partition p goes to its partition p

    @classmethod
    def of(cls, settings: WorkerSettings) -> OutputTopics:
        return cls(
            settings.output_topic,
            settings.dlq_topic,
            settings.incident_topic,
            settings.incident_state_topic,
        )


def _send(
    producer: KafkaProducer, outcome: BatchOutcome, topics: OutputTopics, keyed: KeyPartitions
):
    """A batch's outputs but its changelog records (`Changelog`): events, DLQ records,
    incident messages, each keyed one to its key's partition (`keyed`)."""
    send, futures = producer.send, []
    for topic, outputs in (
        (topics.events, outcome.events),
        (topics.dlq, outcome.dlq),
        (topics.incidents, outcome.incidents + outcome.drift),
    ):
        if outputs:
            track_topic(producer, topic)
            parts = keyed.of(producer, topic, outputs)
            futures += [
                send(topic, key=k, value=v, headers=h, partition=p)
                for (k, v, h), p in zip(outputs, parts, strict=True)
            ]
    return futures


def _send_state(producer: KafkaProducer, records: list, topic: str) -> list:
    """Changelog records (partition, key, value), in order; their futures."""
    if not records:
        return []
    track_topic(producer, topic)
    return [producer.send(topic, key=k, value=v, partition=p) for p, k, v in records]


def _check_acknowledged(futures: list) -> None:
    failed = [f for f in futures if not f.succeeded()]
    if failed:
        raise PublishError(
            f"{len(failed)} of {len(futures)} outputs not acknowledged: {failed[0].exception}"
        )


def _log_commit_failure(offsets, response) -> None:
    # A later commit, or the synchronous one of the next drain, covers these offsets.
    if isinstance(response, Exception):
        log.warning("commit_failed", error=str(response) or type(response).__name__, sync=False)
