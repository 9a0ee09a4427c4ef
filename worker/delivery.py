"""Delivery strategies: publish a batch's outputs and commit its offsets, per guarantee.

* **at-least-once**: send every event and DLQ record, wait for every
  acknowledgement, then commit the batch's offsets. A failure commits nothing.
* **exactly-once**: outputs and offsets in one Kafka transaction; a failure aborts it.

Either way a failed batch raises `PublishError` with nothing committed, and the
worker rewinds its consumer to the batch's first records (`rewind`), so the
batch is read and scored again.
"""

from __future__ import annotations

import socket
from typing import Protocol

import structlog
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from worker.settings import WorkerSettings
from worker.step import BatchOutcome

log = structlog.get_logger("worker.delivery")

FLUSH_TIMEOUT_S = 30


class PublishError(Exception):
    """The broker did not acknowledge every output of a batch; nothing was committed."""


class Delivery(Protocol):
    def producer_options(self) -> dict: ...

    def prepare(self, producer: KafkaProducer) -> None: ...

    def deliver(
        self, outcome: BatchOutcome, producer: KafkaProducer, consumer: KafkaConsumer
    ) -> None: ...


class AtLeastOnce:
    def __init__(self, settings: WorkerSettings):
        self.output_topic = settings.output_topic
        self.dlq_topic = settings.dlq_topic

    def producer_options(self) -> dict:
        return {}

    def prepare(self, producer: KafkaProducer) -> None:
        pass

    def deliver(self, outcome: BatchOutcome, producer, consumer) -> None:
        futures = _send(producer, outcome, self.output_topic, self.dlq_topic)
        producer.flush(timeout=FLUSH_TIMEOUT_S)
        _check_acknowledged(futures)
        consumer.commit(outcome.offsets)


class ExactlyOnce:
    def __init__(self, settings: WorkerSettings):
        self.output_topic = settings.output_topic
        self.dlq_topic = settings.dlq_topic
        # Stable per worker instance, so a restarted worker fences its predecessor.
        self.transactional_id = (
            settings.transactional_id or f"{settings.group_id}-{socket.gethostname()}"
        )

    def producer_options(self) -> dict:
        return {"transactional_id": self.transactional_id, "enable_idempotence": True}

    def prepare(self, producer: KafkaProducer) -> None:
        producer.init_transactions()

    def deliver(self, outcome: BatchOutcome, producer, consumer) -> None:
        producer.begin_transaction()
        try:
            futures = _send(producer, outcome, self.output_topic, self.dlq_topic)
            producer.send_offsets_to_transaction(outcome.offsets, consumer.group_metadata())
            producer.commit_transaction()  # flushes, then commits outputs and offsets atomically
            _check_acknowledged(futures)
        except BaseException:
            try:
                producer.abort_transaction()
            except Exception as e:
                log.warning("abort_transaction_failed", error=str(e))
            raise


def delivery_for(settings: WorkerSettings) -> Delivery:
    return ExactlyOnce(settings) if settings.delivery == "exactly-once" else AtLeastOnce(settings)


def rewind(consumer: KafkaConsumer, firsts: dict[TopicPartition, int]) -> None:
    """Seek each still-assigned partition back to its first uncommitted record."""
    assigned = consumer.assignment()
    for tp, offset in firsts.items():
        if tp in assigned:
            consumer.seek(tp, offset)


def _send(producer: KafkaProducer, outcome: BatchOutcome, output_topic: str, dlq_topic: str):
    futures = [producer.send(output_topic, key=k, value=v, headers=h) for k, v, h in outcome.events]
    futures += [producer.send(dlq_topic, key=k, value=v, headers=h) for k, v, h in outcome.dlq]
    return futures


def _check_acknowledged(futures: list) -> None:
    failed = [f for f in futures if not f.succeeded()]
    if failed:
        raise PublishError(
            f"{len(failed)} of {len(futures)} outputs not acknowledged: {failed[0].exception}"
        )
