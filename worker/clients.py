"""The worker's Kafka clients: one consumer in the group, one producer for its outputs."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.partitioner.default import murmur2

from worker.settings import WorkerSettings

log = structlog.get_logger("worker.clients")

# Each connection attempt gives up after a few seconds, so the worker's own backoff
# logs the wait and honours a stop request; a broker that comes back is retried
# within seconds, not after kafka-python's 30 s bootstrap and reconnect backoff.
ATTEMPT_OPTIONS = {"bootstrap_timeout_ms": 5_000, "reconnect_backoff_max_ms": 5_000}


@dataclass
class KafkaClients:
    consumer: KafkaConsumer
    producer: KafkaProducer

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except Exception as e:  # closing must not hide the error that got us here
            log.warning("consumer_close_failed", error=str(e))
        try:
            self.producer.close(timeout=10)
        except Exception as e:
            log.warning("producer_close_failed", error=str(e))


class KeyPartitions:
    """The partition Kafka's default partitioner gives a keyed record: murmur2 of the
    key, as kafka-python's and the Java client's compute it, so a key's outputs land
    where they would without this. kafka-python hashes in pure Python, ~6 µs a record
    (a quarter of its `send`); here each short key's hash is computed once and kept,
    up to MAX_KEYS of them (then forgotten all at once). A record without a key gets
    None: the producer spreads those itself."""

    MAX_KEYS = 1 << 16
    MAX_KEY_BYTES = 256  # longer keys are hashed every time, not kept

    def __init__(self):
        self._hashes: dict[bytes, int] = {}

    def of(self, producer: KafkaProducer, topic: str, records: list) -> list[int | None]:
        """Per (key, value, headers) record sent to `topic`: its partition. Waits for
        the topic's metadata, as a send would."""
        hashes, partitions = self._hashes, None
        out: list[int | None] = []
        for key, _, _ in records:
            if key is None:
                out.append(None)
                continue
            if partitions is None:  # asked once a call, and only for keyed records
                partitions = sorted(producer.partitions_for(topic))
                n = len(partitions)
            h = hashes.get(key)
            if h is None:
                h = murmur2(key) & 0x7FFFFFFF
                if len(key) <= self.MAX_KEY_BYTES:
                    if len(hashes) >= self.MAX_KEYS:
                        hashes.clear()
                    hashes[key] = h
            out.append(partitions[h % n])
        return out


def producer_config(settings: WorkerSettings, extra: dict | None = None) -> dict:
    """kafka-python producer settings for events and DLQ records (`extra`: the
    delivery strategy's own, e.g. a transactional id)."""
    return dict(
        acks="all",
        linger_ms=5,
        batch_size=256 * 1024,
        retries=5,
        max_block_ms=30_000,
        compression_type=None if settings.compression == "none" else settings.compression,
        **(extra or {}),
    )


def track_topic(producer: KafkaProducer, topic: str) -> None:
    """Have every metadata refresh of the producer include `topic`, before it is sent to.

    kafka-python's producer asks for the metadata of the topics it tracks, and replaces
    what it knew with the answer. It tracks a topic only when a send had to wait for
    the topic's metadata. Tansu answers a request for no topics (the bootstrap's) with
    every topic, so an output topic that existed at start-up is known but untracked:
    the first refresh for another topic (e.g. an auto-created incident topic) forgets
    its partitions, and its unsent batches wait, leader unknown, for refreshes that
    never ask for it, until they expire (120 s). docs/benchmarks.md ("A stall seen in
    these runs"). Idempotent and cheap once tracked; a client without these parts (a
    test fake) is left alone."""
    sender = getattr(producer, "_sender", None)
    add_topic = getattr(sender, "add_topic", None)
    if add_topic is not None:
        add_topic(topic)  # thread-safe: queued for the sender thread, which refreshes


def unknown_leaders(producer: KafkaProducer, futures: list) -> list[str]:
    """The partitions ("topic-partition") of these unacknowledged sends whose leader
    the producer does not know (a stall's usual cause); [] when it cannot tell."""
    metadata = getattr(producer, "_metadata", None)
    leader_for = getattr(metadata, "leader_for_partition", None)
    if leader_for is None:
        return []
    partitions = {
        getattr(getattr(f, "_produce_future", None), "topic_partition", None) for f in futures
    }
    unknown = [tp for tp in partitions if tp is not None and leader_for(tp) in (None, -1)]
    return sorted(f"{tp.topic}-{tp.partition}" for tp in unknown)


def consumer_config(settings: WorkerSettings) -> dict:
    """kafka-python consumer settings: manual commits, committed reads only."""
    return dict(
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.max_batch_size,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        # A fetch the broker parks for lack of data must not outwait the batch deadline.
        fetch_max_wait_ms=min(500, max(5, settings.max_batch_wait_ms)),
    )


def open_clients(
    settings: WorkerSettings,
    listener: ConsumerRebalanceListener | None,
    producer_options: dict | None = None,
) -> KafkaClients:
    """One attempt: a producer and a consumer subscribed to the input topic.
    Raises KafkaError or OSError when the broker cannot be reached."""
    common = {**settings.kafka.client_kwargs(), **ATTEMPT_OPTIONS}
    producer = KafkaProducer(**common, **producer_config(settings, producer_options))
    try:
        consumer = KafkaConsumer(**common, **consumer_config(settings))
        consumer.subscribe([settings.input_topic], listener=listener)
    except BaseException:
        producer.close(timeout=1)
        raise
    return KafkaClients(consumer, producer)
