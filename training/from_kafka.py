"""Retraining from the stream: a bounded snapshot of the input topic, decoded by the
worker's own codec, with the records the live model calls anomalous left out, and a
candidate published only when it is not worse than the live model on held-out
normal rows.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import structlog
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from worker.checkpoint import CheckpointError, read_latest
from worker.codec import Codec
from worker.scoring import Scorer, load_scorer
from worker.settings import KafkaSettings

log = structlog.get_logger("training.from_kafka")

# A candidate may be this much worse than the live model on held-out rows and still
# replace it: retraining tracks slow drift, and equal-quality models differ by noise.
NOT_WORSE_TOLERANCE = 0.05


class SnapshotError(Exception):
    """The topic could not give a usable snapshot; the message says why."""


@dataclass
class Snapshot:
    rows: np.ndarray
    feature_names: list[str]
    records: int
    rejected: int
    excluded_anomalies: int


def live_scorer(model_dir: Path) -> Scorer | None:
    try:
        version = read_latest(model_dir)
        return load_scorer(model_dir / version) if version else None
    except CheckpointError as e:
        log.warning("live model unusable; training without it", error=str(e))
        return None


def _infer_feature_names(records: list) -> list[str]:
    """Names from the first JSON record: its feature keys, or f0..fN-1 for an array."""
    for rec in records:
        try:
            doc = orjson.loads(rec.value)
        except (orjson.JSONDecodeError, TypeError):
            continue
        feats = doc.get("features") if isinstance(doc, dict) else doc
        if isinstance(feats, dict) and feats:
            return sorted(feats)
        if isinstance(feats, list) and feats:
            return [f"f{i}" for i in range(len(feats))]
    raise SnapshotError(
        "no JSON record to learn the feature names from; train the first model with --data"
    )


def read_snapshot(
    kafka: KafkaSettings,
    topic: str,
    max_records: int,
    max_seconds: float,
    since_ms: int | None = None,
) -> list:
    """The newest ≤ max_records records of `topic` by record timestamp (only those at or
    after `since_ms` when given), read for at most max_seconds, oldest first. No
    consumer group: nothing is committed.

    Partitions fill unevenly (keys hash, unkeyed records land at random), so the newest
    records are not an equal share of each partition: each partition's last max_records
    are read and only the newest max_records of them all are kept."""
    consumer = KafkaConsumer(
        **kafka.client_kwargs(), enable_auto_commit=False, isolation_level="read_committed"
    )
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise SnapshotError(f"topic {topic!r} does not exist or has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        begins = consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(begins[tp], ends[tp] - max_records))
        # A partition's end is raised to the high watermark of its first fetch: some
        # brokers (Tansu 0.6) answer ListOffsets with the last batch's base offset + 1,
        # which would leave out all but the first record of the newest batch.
        fetched: set = set()
        newest: list = []  # a min-heap of (timestamp, partition, offset, record)
        deadline = time.monotonic() + max_seconds
        remaining = {tp for tp in tps if ends[tp] > consumer.position(tp)}
        while remaining and time.monotonic() < deadline:
            for tp, recs in consumer.poll(timeout_ms=500).items():
                if tp not in fetched:
                    fetched.add(tp)
                    ends[tp] = max(ends[tp], consumer.highwater(tp) or 0)
                for r in recs:
                    if r.offset >= ends[tp] or (since_ms is not None and r.timestamp < since_ms):
                        continue
                    item = (r.timestamp, r.partition, r.offset, r)
                    if len(newest) < max_records:
                        heapq.heappush(newest, item)
                    else:
                        heapq.heappushpop(newest, item)
                if consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return [item[-1] for item in sorted(newest)]
    finally:
        consumer.close()


def snapshot_rows(records: list, live: Scorer | None, leave_out_anomalies: bool = True) -> Snapshot:
    """The snapshot's valid rows, decoded for the live model's features; without the
    rows the live model calls anomalous unless `leave_out_anomalies` is False."""
    names = live.feature_names if live else _infer_feature_names(records)
    decoded = Codec(names).decode(records)
    rows = decoded.rows
    excluded = 0
    if live is not None and leave_out_anomalies and len(rows):
        keep = ~np.concatenate(
            [live.score_batch(rows[i : i + 65536]).is_anomaly for i in range(0, len(rows), 65536)]
        )
        excluded = int((~keep).sum())
        rows = rows[keep]
    return Snapshot(rows, names, len(records), len(decoded.rejected), excluded)


def holdout_error(scorer: Scorer, rows: np.ndarray, scale: np.ndarray) -> float:
    """Mean absolute reconstruction error on `rows`, in units of a common `scale`,
    so that two models with different scalers are compared on equal terms."""
    recon = scorer.reconstruct(rows)
    return float(np.mean(np.abs(rows - recon) / scale))


def compare_with_live(
    candidate: Scorer, live: Scorer, holdout: np.ndarray
) -> tuple[bool, float, float]:
    """(publish?, candidate error, live error) on the candidate's held-out normal rows."""
    scale = np.asarray(candidate.manifest.scaler.scale, dtype=np.float32)
    new = holdout_error(candidate, holdout, scale)
    old = holdout_error(live, holdout, scale)
    return new <= old * (1 + NOT_WORSE_TOLERANCE), new, old


def drift_openings(records: list, input_topic: str) -> list[int]:
    """`started_at_ms` of each drift incident on `input_topic` that opened in `records`
    (docs/contract.md#incidents); other incidents, and records that are not one, are
    passed over."""
    opened = []
    for rec in records:
        try:
            doc = orjson.loads(rec.value)
        except (orjson.JSONDecodeError, TypeError):
            continue
        if not isinstance(doc, dict):
            continue
        if (doc.get("kind"), doc.get("status"), doc.get("topic")) != ("drift", "open", input_topic):
            continue
        started = doc.get("started_at_ms")
        if isinstance(started, int) and not isinstance(started, bool):
            opened.append(started)
    return opened


class DriftIncidents:
    """Drift incidents as they arrive on the incident topic: read from its end when
    created, no consumer group (nothing committed; a restarted trainer does not
    retrain for incidents it has seen before)."""

    def __init__(self, kafka: KafkaSettings, topic: str, input_topic: str):
        self.input_topic = input_topic
        self.consumer = KafkaConsumer(
            **kafka.client_kwargs(), enable_auto_commit=False, isolation_level="read_committed"
        )
        parts = self.consumer.partitions_for_topic(topic)
        if not parts:
            self.consumer.close()
            raise SnapshotError(f"incident topic {topic!r} does not exist or has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.consumer.position(tp)  # resolve "the end" now, not at the first poll

    def poll(self, timeout_s: float) -> list[int]:
        """`started_at_ms` of the drift openings that arrived within timeout_s."""
        polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        return drift_openings([r for recs in polled.values() for r in recs], self.input_topic)

    def close(self) -> None:
        self.consumer.close()
