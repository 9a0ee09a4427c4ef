"""One micro-batch, records in → outcome out: decode, score, build events and DLQ records.

Pure with respect to Kafka: nothing is sent or committed here. The delivery
strategy (worker/delivery.py) publishes the outcome and commits its offsets;
telemetry (worker/metrics.py) counts it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.codec import Codec, Rejected
from worker.events import build_events, dlq_record
from worker.incidents import IncidentTracker, Observed, changelog_records, rows_of
from worker.scoring import BatchScores, Scorer

Output = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


@dataclass(frozen=True, slots=True)
class Scored:
    """A batch's valid rows and the serving model's results for them, for the loop's
    observers (drift, shadow); dropped before the outcome is delivered."""

    vectors: np.ndarray  # float32 [B, D], input units
    scores: BatchScores


@dataclass(slots=True)
class BatchOutcome:
    """What one batch produced, ready to deliver."""

    records: list  # the consumer records, as polled
    events: list[Output]  # for WORKER_OUTPUT_TOPIC
    dlq: list[Output]  # for WORKER_DLQ_TOPIC
    offsets: dict[TopicPartition, OffsetAndMetadata]  # next offset per partition
    rows: int = 0  # decoded vectors (a float32-rows record holds several)
    anomalies: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    compute_s: float = 0.0  # decode + score + build
    incidents: list[Output] = field(default_factory=list)  # for WORKER_INCIDENT_TOPIC
    # drift incidents, for WORKER_INCIDENT_TOPIC too; a rewind carries them (Abandoned)
    drift: list[Output] = field(default_factory=list)
    # for WORKER_INCIDENT_STATE_TOPIC: (partition, key, value or None for a tombstone)
    state: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    tracked: Observed | None = None  # what the batch did to the incident tracker
    scored: Scored | None = None


def score_records(
    records: list,
    codec: Codec,
    scorer: Scorer,
    emit_all: bool,
    now_ms: int | None = None,
    tracker: IncidentTracker | None = None,
    with_state: bool = True,
) -> BatchOutcome:
    """Decode, score and turn one batch of consumer records into its outputs; with a
    tracker, also its incident messages and (with_state) changelog records."""
    t0 = time.perf_counter()
    decoded = codec.decode(records)
    events, anomalies, tracked, scored = [], 0, None, None
    if len(decoded):
        scores = scorer.score_batch(decoded.rows, explain="all" if emit_all else "anomalies")
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        events = build_events(decoded, scores, scorer, emit_all, now_ms)
        anomalies = int(scores.is_anomaly.sum())
        scored = Scored(decoded.rows, scores)
        if tracker is not None:
            tracked = tracker.observe(
                rows_of(decoded, scores, scorer.feature_names, scorer.version, scorer.continuous)
            )
    elif tracker is not None:
        tracked = tracker.observe(None)  # journalled all the same: one per batch
    return BatchOutcome(
        records=records,
        events=events,
        dlq=[dlq_record(r) for r in decoded.rejected],
        offsets=next_offsets(records),
        rows=len(decoded),
        anomalies=anomalies,
        rejected=list(decoded.rejected),
        compute_s=time.perf_counter() - t0,
        incidents=tracked.messages if tracked else [],
        state=changelog_records(tracked) if tracked and with_state else [],
        tracked=tracked,
        scored=scored,
    )


def next_offsets(records: list) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offset to commit per partition: one past the last record of the batch."""
    last: dict[tuple[str, int], int] = {}
    for rec in records:
        key = (rec.topic, rec.partition)
        if rec.offset >= last.get(key, -1):
            last[key] = rec.offset
    return {TopicPartition(t, p): OffsetAndMetadata(o + 1, "", -1) for (t, p), o in last.items()}


def first_offsets(records: list) -> dict[TopicPartition, int]:
    """The first offset per partition: where a rewind restarts."""
    firsts: dict[TopicPartition, int] = {}
    for rec in records:
        tp = TopicPartition(rec.topic, rec.partition)
        firsts[tp] = min(firsts.get(tp, rec.offset), rec.offset)
    return firsts


def latency_sample(records: list, now_ms: float, samples: int = 32) -> np.ndarray:
    """End-to-end latency in seconds of an evenly spaced sample of the records that
    carry a producer timestamp."""
    step = max(1, len(records) // samples)
    stamps = np.fromiter((r.timestamp for r in records[::step]), dtype=np.float64)
    return np.maximum(0.0, (now_ms - stamps[stamps > 0]) / 1000)
