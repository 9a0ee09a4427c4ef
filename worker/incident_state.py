"""The worker's incident tracker and its state: built from the settings, read back
from its changelog topic (WORKER_INCIDENT_STATE_TOPIC, docs/contract.md#incidents)
when partitions are assigned.

A consumer of its own, in assign() mode and without a group, reads the changelog
partitions that carry the numbers of the newly assigned input partitions, from the
beginning to their end, before any record of those partitions is scored.
"""

from __future__ import annotations

import time

import structlog
from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from worker.incidents import IncidentConfig, IncidentTracker, read_changelog
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings

log = structlog.get_logger("worker.incidents")

READ_TIMEOUT_S = 60.0


class RestoreError(Exception):
    """The changelog could not be read to its end in time."""


def read_state(
    settings: WorkerSettings, partitions: list[int], timeout_s: float = READ_TIMEOUT_S
) -> tuple[dict[int, tuple[dict, int | None, int | None]], int]:
    """partition → (entity key → packed state, applied, stream_ms), and the number of
    changelog records read."""
    topic = settings.incident_state_topic
    consumer = KafkaConsumer(
        **settings.kafka.client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    try:
        known = consumer.partitions_for_topic(topic) or set()
        missing = sorted(set(partitions) - known)
        if missing:
            raise RestoreError(
                f"the changelog topic {topic!r} has no partition {missing} "
                "(it needs at least as many partitions as the input)"
            )
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records: dict[TopicPartition, list] = {tp: [] for tp in tps}
        deadline = time.monotonic() + timeout_s
        todo = {tp for tp in tps if ends[tp] > 0}
        while todo:
            if time.monotonic() > deadline:
                raise RestoreError(f"{topic}: not read to its end in {timeout_s:.0f}s")
            for tp, recs in consumer.poll(timeout_ms=200).items():
                # every record read is kept, also past `ends`: the changelog is this
                # worker's alone now and read_committed hides open transactions, and
                # Tansu reports a partition's end as its last batch's base offset + 1,
                # so a filter at `ends` lost the newest batch's state and marker
                records[tp].extend(recs)
            todo = {tp for tp in todo if consumer.position(tp) < ends[tp]}
        read = sum(len(v) for v in records.values())
        return {tp.partition: read_changelog(recs) for tp, recs in records.items()}, read
    finally:
        consumer.close(autocommit=False)


def incident_tracker(settings: WorkerSettings) -> IncidentTracker | None:
    """The tracker the settings ask for; None when incidents are off."""
    if not settings.incidents_on:
        return None
    return IncidentTracker(
        IncidentConfig(
            topic=settings.input_topic,
            window=settings.incident_window,
            open_share=settings.incident_open_share,
            update_ms=settings.incident_update_ms,
            quiet_ms=settings.incident_quiet_ms,
            max_keys=settings.incident_max_keys,
            stuck_records=settings.stuck_records,
        )
    )


def restore_incidents(
    tracker: IncidentTracker, settings: WorkerSettings, metrics: WorkerMetrics, partitions: list
) -> None:
    """Read the newly assigned partitions' state into the tracker (the rebalance
    listener, before any of their records is scored). Under at-least-once their open
    and recently resolved incidents are announced again with the next batch."""
    if not partitions:
        return
    t0 = time.perf_counter()
    try:
        restored, read = read_state(settings, partitions)
    except (KafkaError, OSError, RestoreError) as e:
        log.error(
            "incident_state_restore_failed",
            partitions=partitions,
            error=str(e) or type(e).__name__,
            action="these partitions' incidents start from no state",
        )
        return
    reannounce = settings.delivery == "at-least-once"
    queued = sum(
        tracker.restore(p, states, applied, stream_ms, reannounce)
        for p, (states, applied, stream_ms) in restored.items()
    )
    seconds = time.perf_counter() - t0
    metrics.incident_restore.observe(seconds)
    metrics.incident_state_restored.inc(read)
    metrics.incident_keys.set(len(tracker.states))
    log.info(
        "incident_state_restored",
        partitions=partitions,
        records=read,
        keys=sum(len(s) for s, _, _ in restored.values()),
        reannounced=queued,
        seconds=round(seconds, 3),
    )
