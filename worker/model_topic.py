"""Checkpoints over Kafka (docs/contract.md#model-topic).

The trainer publishes each verified version directory to a compacted topic
(`publish_version`): the directory packed into one tar (worker.model_bundle), cut
into chunks, every chunk acknowledged before the commit record that makes the
version complete. Workers read the topic with a consumer of their own, assigned
(no group), from the beginning (`ModelTopicSource`): a version is offered once its
commit record is there, assembled and checked against the commit (size, sha256),
unpacked into the worker's cache and then verified like a directory checkpoint.
Versions are ordered by name (UTC creation time to the millisecond, then the
weights' sha256 prefix); a worker never goes back to a version older than the one
it serves, and at start it offers nothing before it has read the whole topic.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from worker.checkpoint import MANIFEST_FILE, ManifestInvalid
from worker.clients import ATTEMPT_OPTIONS
from worker.model_bundle import MalformedRecord, TopicState, pack, records_for, unpack
from worker.settings import KafkaSettings

log = structlog.get_logger("worker.model_topic")

# How long one look at the topic may read (or wait for the broker) before it answers
# with what it has; the next look goes on from there.
CATCH_UP_S = 10.0
POLL_MS = 200
SEND_TIMEOUT_S = 60.0
# The partition every record of the model topic goes to: one partition keeps a
# version's chunks before its commit record, in order.
PARTITION = 0


class TopicMissing(Exception):
    """The model topic does not exist (yet)."""


class TopicReader:
    """A consumer assigned to every partition of the model topic (no group, no
    commits), reading it from the beginning into a TopicState."""

    def __init__(self, kafka: KafkaSettings, topic: str, chunk_bytes_max: int = 16 << 20):
        self.kafka = kafka
        self.topic = topic
        self.fetch_bytes = chunk_bytes_max
        self.consumer: KafkaConsumer | None = None
        self.partitions: list[TopicPartition] = []

    def _open(self) -> KafkaConsumer:
        consumer = KafkaConsumer(
            **self.kafka.client_kwargs(),
            **ATTEMPT_OPTIONS,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            allow_auto_create_topics=False,
            isolation_level="read_committed",
            max_partition_fetch_bytes=self.fetch_bytes,
            fetch_max_bytes=max(self.fetch_bytes, 52_428_800),
            fetch_max_wait_ms=100,
            request_timeout_ms=int(CATCH_UP_S * 1000),
        )
        try:
            ids = consumer.partitions_for_topic(self.topic)
            if not ids:
                raise TopicMissing(f"topic {self.topic!r} does not exist")
            self.partitions = [TopicPartition(self.topic, p) for p in sorted(ids)]
            consumer.assign(self.partitions)
            consumer.seek_to_beginning(*self.partitions)
        except BaseException:
            consumer.close(autocommit=False)
            raise
        return consumer

    def catch_up(self, state: TopicState, budget_s: float) -> bool:
        """Apply every record up to the end offsets as of now; True when they were all
        read within `budget_s`. Raises KafkaError, OSError or TopicMissing."""
        deadline = time.monotonic() + budget_s

        def left_ms() -> int:
            return max(1, int((deadline - time.monotonic()) * 1000))

        if self.consumer is None:
            self.consumer = self._open()
        consumer = self.consumer
        end = consumer.end_offsets(self.partitions, timeout_ms=left_ms())
        while any(consumer.position(tp, timeout_ms=left_ms()) < end[tp] for tp in self.partitions):
            if time.monotonic() >= deadline:
                return False
            for tp, records in consumer.poll(timeout_ms=min(POLL_MS, left_ms())).items():
                for r in records:
                    try:
                        state.apply(r.key, r.value, r.headers)
                    except MalformedRecord as e:
                        log.warning(
                            "model_record_ignored",
                            topic=tp.topic,
                            partition=tp.partition,
                            offset=r.offset,
                            error=str(e),
                        )
        return True

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except Exception as e:  # closing must not hide what got us here
                log.warning("model_topic_close_failed", error=str(e))
            self.consumer = None


class ModelTopicSource:
    """Versions from the model topic, for worker.reload.CheckpointWatcher."""

    def __init__(self, kafka: KafkaSettings, topic: str, cache_dir: Path | None = None):
        self.where = f"topic {topic}"
        self.topic = topic
        self.reader = TopicReader(kafka, topic)
        self.state = TopicState()
        self._own_cache = cache_dir is None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._caught_up = False
        self._trouble: str | None = None
        # versions refused for the checkpoint's sake: never offered again, even when
        # a reconnection reads the topic from the beginning once more
        self._bad: set[str] = set()

    def latest(self) -> str | None:
        """The newest complete version newer than the one serving, once the topic has
        been read to its end at least once. The broker being away is not a refusal:
        it is logged once and the next poll looks again."""
        try:
            done = self.reader.catch_up(self.state, CATCH_UP_S)
        except (KafkaError, OSError, TopicMissing) as e:
            trouble = f"{type(e).__name__}: {e}"
            if trouble != self._trouble:
                log.warning("model_topic_unavailable", topic=self.topic, error=trouble)
                self._trouble = trouble
            self.reader.close()
            return None
        if self._trouble is not None:
            log.info("model_topic_available", topic=self.topic)
            self._trouble = None
        self._caught_up = self._caught_up or done
        return self.state.newest_complete(exclude=self._bad) if self._caught_up else None

    def _cache(self) -> Path:
        if self.cache_dir is None:
            self.cache_dir = Path(tempfile.mkdtemp(prefix="cae-model-cache-"))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return self.cache_dir

    def open(self, version: str) -> Path:
        """Assemble and unpack `version` into the cache; raises a CheckpointError for a
        torn or tampered upload (and worker.checkpoint.read_checkpoint checks the rest)."""
        payload, _ = self.state.payload(version)
        cache = self._cache()
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
        try:
            unpack(payload, tmp)
            _check_manifest_names(tmp, version)
            final = cache / version
            if final.exists():  # a leftover from an earlier run
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def verified(self, version: str) -> None:
        self.state.forget_through(version)
        self._prune(keep=version)

    def refused(self, version: str, final: bool) -> None:
        if final:
            self._bad.add(version)
            self.state.forget(version)
            if self.cache_dir is not None:
                shutil.rmtree(self.cache_dir / version, ignore_errors=True)

    def _prune(self, keep: str) -> None:
        """The serving version's files are all the cache holds (the scorer is in memory)."""
        if self.cache_dir is None:
            return
        for d in self.cache_dir.iterdir():
            if d.is_dir() and d.name != keep and not d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        self.reader.close()
        if self._own_cache and self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


def _check_manifest_names(version_dir: Path, version: str) -> None:
    """The manifest inside must name the version the topic names (a renamed older
    checkpoint must not pass for a newer one). Anything else about the manifest is
    read_checkpoint's to judge."""
    try:
        named = json.loads((version_dir / MANIFEST_FILE).read_bytes()).get("version")
    except (OSError, ValueError, AttributeError):
        return
    if named != version:
        raise ManifestInvalid(f"{version}: its {MANIFEST_FILE} names version {named!r}")


def publish_version(
    kafka: KafkaSettings,
    topic: str,
    version_dir: str | Path,
    chunk_bytes: int,
    keep: int | None = None,
    timeout_s: float = SEND_TIMEOUT_S,
) -> int:
    """Send one version directory to the model topic: every chunk, acknowledged, then
    the commit record. With `keep`, older versions beyond the newest `keep` complete
    ones (and uploads that never completed before them) get tombstones.
    Returns the number of records sent. Raises KafkaError when the broker refuses or
    does not acknowledge in time; without its commit record the version is never served."""
    version_dir = Path(version_dir)
    manifest = json.loads((version_dir / MANIFEST_FILE).read_bytes())
    version = version_dir.name
    records = records_for(
        version, str(manifest.get("created_at", "")), pack(version_dir), chunk_bytes
    )
    producer = KafkaProducer(
        **kafka.client_kwargs(),
        acks="all",
        retries=5,
        linger_ms=5,
        max_request_size=chunk_bytes + 64 * 1024,
        max_block_ms=int(timeout_s * 1000),
        bootstrap_timeout_ms=int(timeout_s * 1000),
    )
    try:
        *chunks, commit = records
        futures = [
            producer.send(topic, key=r.key, value=r.value, headers=r.headers, partition=PARTITION)
            for r in chunks
        ]
        producer.flush(timeout=timeout_s)
        for f in futures:
            f.get(timeout=timeout_s)
        producer.send(
            topic, key=commit.key, value=commit.value, headers=commit.headers, partition=PARTITION
        ).get(timeout=timeout_s)
        sent = len(records)
        if keep is not None:
            sent += _prune_topic(kafka, topic, keep, producer, timeout_s)
    finally:
        producer.close(timeout=10)
    log.info("model_published_to_topic", topic=topic, version=version, records=len(records))
    return sent


def _prune_topic(
    kafka: KafkaSettings, topic: str, keep: int, producer: KafkaProducer, timeout_s: float
) -> int:
    """Tombstones for every version older than the newest `keep` complete ones."""
    state = TopicState()
    reader = TopicReader(kafka, topic)
    try:
        if not reader.catch_up(state, timeout_s):
            log.warning("model_topic_not_pruned", topic=topic, reason="not read to its end in time")
            return 0
    finally:
        reader.close()
    complete = state.complete()
    if len(complete) <= keep:
        return 0
    oldest_kept = complete[-keep]
    doomed = {v: keys for v, keys in state.versions().items() if v < oldest_kept}
    futures = [
        producer.send(topic, key=k, value=None, partition=PARTITION)
        for keys in doomed.values()
        for k in sorted(keys)
    ]
    producer.flush(timeout=timeout_s)
    for f in futures:
        f.get(timeout=timeout_s)
    if doomed:
        log.info("model_topic_pruned", topic=topic, versions=sorted(doomed), records=len(futures))
    return len(futures)
