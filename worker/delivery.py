"""Delivery strategies: publish each batch's outputs and commit its offsets, per guarantee.

* **at-least-once** (pipelined): a batch's events and DLQ records are sent and the
  worker goes on to poll and score the next batch while they are in flight (at
  most `PIPELINE_DEPTH` batches). Offsets are committed asynchronously, in order,
  up to the last batch whose every output, and every earlier batch's, was
  acknowledged (`worker/pipeline.py`). A failed output fails its batch: nothing of
  it or of any later batch is committed.
* **exactly-once**: the outputs and offsets of the micro-batches of one commit
  interval (`WORKER_COMMIT_INTERVAL_MS`, at most `PIPELINE_DEPTH` batches' worth of
  records) go in one Kafka transaction; a failure aborts it. The commit's last part
  (flushing the outputs, ending the transaction) runs while the worker polls and
  scores the next batch; nothing is sent before it has ended, so transactions never
  overlap and the next one begins only after this one committed.

A failure is reported in `Settled.error`; the worker then calls `abandon`, which
hands back every record not committed, and rewinds its consumer to the first of
them (`rewind`), so they are read and scored again. `settle(wait="all")` drains:
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

from worker.pipeline import Finished, Pipeline, PublishError, Settled, merge_offsets
from worker.settings import WorkerSettings
from worker.step import BatchOutcome

log = structlog.get_logger("worker.delivery")

FLUSH_TIMEOUT_S = 30
PIPELINE_DEPTH = 4  # micro-batches in flight (at-least-once) or in one transaction

Wait = Literal["none", "room", "all"]

__all__ = ["PublishError", "Settled", "delivery_for", "rewind"]


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

    def abandon(self, producer: KafkaProducer) -> list:
        """Drop everything not committed; its records, oldest first."""
        ...


class AtLeastOnce:
    def __init__(self, settings: WorkerSettings, depth: int = PIPELINE_DEPTH):
        self.topics = OutputTopics.of(settings)
        self.pipeline = Pipeline(depth)
        self._uncommitted: dict = {}  # acknowledged offsets not yet committed synchronously

    def producer_options(self) -> dict:
        return {}

    def prepare(self, producer: KafkaProducer) -> None:
        pass

    def in_flight(self) -> int:
        return self.pipeline.records

    def due_in_s(self) -> float | None:
        return 0.0 if len(self.pipeline) else None

    def submit(self, outcome: BatchOutcome, producer, consumer) -> None:
        self.pipeline.add(outcome, _send(producer, outcome, self.topics))

    def settle(self, producer, consumer, wait: Wait = "none") -> Settled:
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

    def abandon(self, producer) -> list:
        return self.pipeline.abandon()


class ExactlyOnce:
    def __init__(self, settings: WorkerSettings, depth: int = PIPELINE_DEPTH, clock=time.monotonic):
        self.topics = OutputTopics.of(settings)
        self.interval_s = settings.commit_interval_ms / 1000
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
        self._records = 0
        self._committing = None  # the commit in flight: its result, to wait on
        self._committed: list[Finished] = []  # committed, not yet reported by settle

    def producer_options(self) -> dict:
        return {"transactional_id": self.transactional_id, "enable_idempotence": True}

    def prepare(self, producer: KafkaProducer) -> None:
        producer.init_transactions()

    def in_flight(self) -> int:
        return self._records

    def due_in_s(self) -> float | None:
        if self._committing is not None or self._committed:
            return 0.0
        if not self._batches:
            return None
        return max(0.0, self._opened_at + self.interval_s - self.clock())

    def submit(self, outcome: BatchOutcome, producer, consumer) -> None:
        if self._committing is not None:  # the worker settles (wait="room") before it submits
            raise RuntimeError("submit while a transaction commits")
        if not self._open:
            producer.begin_transaction()
            self._open, self._opened_at = True, self.clock()
        self._batches.append((outcome, time.perf_counter()))
        self._records += len(outcome.records)
        self._futures += _send(producer, outcome, self.topics)

    def settle(self, producer, consumer, wait: Wait = "none") -> Settled:
        if self._committing is not None:
            if wait == "none" and not self._committing.is_done:
                return Settled()  # still committing: the loop polls and scores meanwhile
            return self._end_commit(producer)
        if self._committed:
            finished, self._committed = self._committed, []
            return Settled(finished)
        if not self._batches:
            return Settled()
        due = (
            wait == "all"
            or self._records >= self.max_records
            or self.clock() - self._opened_at >= self.interval_s
        )
        if not due:
            return Settled()
        outcomes = [o for o, _ in self._batches]
        try:
            producer.send_offsets_to_transaction(merge_offsets(outcomes), consumer.group_metadata())
            # flushes, then commits outputs and offsets atomically
            self._committing = _begin_commit(producer)
        except (KafkaError, PublishError) as e:
            self._abort(producer)
            return Settled(error=e)
        if wait == "none" and not self._committing.is_done:
            return Settled()  # the loop polls and scores the next batch meanwhile
        return self._end_commit(producer)

    def _end_commit(self, producer) -> Settled:
        """Wait for the commit in flight; its batches finished, or its error (aborted)."""
        committing, self._committing = self._committing, None
        try:
            committing.wait()  # raises the commit's error
            self._open = False
            _check_acknowledged(self._futures)
        except (KafkaError, PublishError) as e:
            self._abort(producer)
            return Settled(error=e)
        now = time.perf_counter()
        finished = [Finished(o, now - t) for o, t in self._batches]
        self._batches, self._futures, self._records = [], [], 0
        return Settled(finished)

    def abandon(self, producer) -> list:
        if self._committing is not None:  # committed records must not be read again
            settled = self._end_commit(producer)
            self._committed += settled.finished
        self._abort(producer)
        records = [r for o, _ in self._batches for r in o.records]
        self._batches, self._futures, self._records = [], [], 0
        return records

    def _abort(self, producer) -> None:
        if not self._open:
            return
        self._open = False
        try:
            producer.abort_transaction()
        except Exception as e:
            log.warning("abort_transaction_failed", error=str(e))


class _Committed:
    """The result of a commit that already ended."""

    is_done = True

    def wait(self) -> None:
        pass


def _begin_commit(producer: KafkaProducer):
    """Start committing the open transaction; returns what to wait on (`is_done`,
    `wait()` raising the commit's error). KafkaProducer.commit_transaction() starts
    the commit, wakes its sender thread and waits; this does the first two and leaves
    the wait to the caller. A client without those parts commits here, blocking."""
    manager = getattr(producer, "_transaction_manager", None)
    sender = getattr(producer, "_sender", None)
    if manager is None or sender is None or not hasattr(manager, "begin_commit"):
        producer.commit_transaction()
        return _Committed()
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
    output: str
    dlq: str
    incidents: str | None  # None: incidents are off

    @classmethod
    def of(cls, settings: WorkerSettings) -> OutputTopics:
        incidents = settings.incident_topic if settings.incidents_on else None
        return cls(settings.output_topic, settings.dlq_topic, incidents)


def _send(producer: KafkaProducer, outcome: BatchOutcome, topics: OutputTopics):
    futures = [
        producer.send(topics.output, key=k, value=v, headers=h) for k, v, h in outcome.events
    ]
    futures += [producer.send(topics.dlq, key=k, value=v, headers=h) for k, v, h in outcome.dlq]
    if topics.incidents is not None:
        futures += [
            producer.send(topics.incidents, key=k, value=v, headers=h)
            for k, v, h in outcome.incidents
        ]
    return futures


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
