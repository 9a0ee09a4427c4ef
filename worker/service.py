"""The worker loop: poll → decode → micro-batch → score → publish → commit.

Offsets are committed only for records whose events and DLQ records the broker
acknowledged (at-least-once), or inside the same transaction (exactly-once).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import structlog
import torch
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.batcher import MicroBatcher
from worker.codec import Codec
from worker.events import build_events, dlq_record
from worker.metrics import HealthServer, WorkerMetrics
from worker.reload import CheckpointWatcher
from worker.scoring import Scorer, resolve_device
from worker.settings import WorkerSettings

log = structlog.get_logger("worker")

IDLE_POLL_S = 0.2
POLL_RETRY_S = 0.5


class PublishError(Exception):
    """The broker did not acknowledge every output of a batch; nothing was committed."""


class StartupError(Exception):
    """The worker cannot start (no model in time); the message says why."""


@dataclass
class RunSummary:
    records: int = 0
    rows: int = 0
    anomalies: int = 0
    rejected: int = 0
    batches: int = 0
    publish_failures: int = 0
    reloads: int = 0
    versions: list[str] = field(default_factory=list)


class _FlushOnRevoke(ConsumerRebalanceListener):
    def __init__(self, worker: Worker):
        self.worker = worker

    def _count_held(self, minus=()) -> None:
        # minus the revoked ones: kafka-python still lists them in assignment() while
        # the group rebalances, and a worker that is rejoining holds nothing
        consumer = self.worker.consumer
        held = set(consumer.assignment()) - set(minus) if consumer is not None else set()
        self.worker._set_partitions_held(len(held))

    def on_partitions_revoked(self, revoked):
        self.worker.flush(reason="revoked")
        self._count_held(minus=revoked)

    def on_partitions_assigned(self, assigned):
        self.worker._last_records_at = time.monotonic()  # idle counts from the assignment
        self._count_held()
        log.info(
            "partitions_assigned",
            partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in assigned),
        )


class Worker:
    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.device = resolve_device(settings.device)
        torch.set_num_threads(settings.torch_threads)
        self.summary = RunSummary()
        self._stop = threading.Event()
        self.scorer: Scorer | None = None
        self.codec: Codec | None = None
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.batcher = MicroBatcher(settings.max_batch_size, settings.max_batch_wait_ms / 1000)
        self.watcher = CheckpointWatcher(
            settings.model_dir,
            self.device,
            settings.precision,
            settings.reload_poll_s,
            self.metrics,
            cuda_graphs=settings.cuda_graphs,
        )
        self.health: HealthServer | None = None
        self._transactional = settings.delivery == "exactly-once"
        self._last_records_at = time.monotonic()
        self.partitions_held = 0  # kept by the rebalance listener (_FlushOnRevoke)

    # -- lifecycle ---------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        """Signal handlers call this: it only flips a flag; the loop drains."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> RunSummary:
        try:
            self._start()
            if not self.stopping:
                self._loop()
                self.flush(reason="shutdown")
        finally:
            self._close()
        return self.summary

    def _start(self) -> None:
        s = self.settings
        if s.metrics_port:
            self.health = HealthServer(self.metrics, s.metrics_host, s.metrics_port).start()
        self.metrics.set_ready(False, "waiting for a model")
        scorer = self.watcher.wait_for_first(s.wait_for_model_s, self._stop)
        if scorer is None:
            if self.stopping:
                return
            raise StartupError(
                f"no valid model in {s.model_dir} after {s.wait_for_model_s:.0f}s "
                "(train one: python -m training --data FILE --out DIR)"
            )
        self._use(scorer)
        self.watcher.start()
        self.metrics.set_ready(False, "connecting to the broker")
        self.metrics.readiness_probe = self._broker_silence
        self._connect()

    def _connect(self) -> None:
        s = self.settings
        # Each attempt gives up after a few seconds, so the wait is logged with our own
        # backoff and a stop request is honoured; a broker that comes back is retried
        # within seconds, not after kafka-python's 30 s bootstrap and reconnect backoff.
        common = {
            **s.kafka.client_kwargs(),
            "bootstrap_timeout_ms": 5_000,
            "reconnect_backoff_max_ms": 5_000,
        }
        delay = 0.5
        while not self.stopping:
            # alive while waiting for the broker: /healthz stays 200 (no container
            # restart loop), /readyz says not ready
            self.metrics.heartbeat()
            try:
                self.producer = KafkaProducer(**common, **self.producer_config())
                if self._transactional:
                    self.producer.init_transactions()
                self.consumer = KafkaConsumer(
                    **common,
                    group_id=s.group_id,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    max_poll_records=s.max_batch_size,
                    session_timeout_ms=s.session_timeout_ms,
                    heartbeat_interval_ms=s.heartbeat_interval_ms,
                    isolation_level="read_committed",
                    max_partition_fetch_bytes=4 * 1024 * 1024,
                    # A fetch the broker parks for lack of data must not outwait the batch deadline.
                    fetch_max_wait_ms=min(500, max(5, s.max_batch_wait_ms)),
                )
                self.consumer.subscribe([s.input_topic], listener=_FlushOnRevoke(self))
                log.info(
                    "connected",
                    bootstrap=s.kafka.bootstrap_servers,
                    input=s.input_topic,
                    group=s.group_id,
                    delivery=s.delivery,
                    device=str(self.device),
                )
                return
            except (KafkaError, OSError) as e:
                self._close_clients()
                log.warning(
                    "broker_unreachable",
                    bootstrap=s.kafka.bootstrap_servers,
                    error=str(e) or type(e).__name__,
                    retry_in_s=delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, 15.0)

    def producer_config(self) -> dict:
        """kafka-python producer settings for events and DLQ records."""
        s = self.settings
        config = dict(
            acks="all",
            linger_ms=5,
            batch_size=256 * 1024,
            retries=5,
            max_block_ms=30_000,
            compression_type=None if s.compression == "none" else s.compression,
        )
        if self._transactional:
            txn_id = s.transactional_id or f"{s.group_id}-{socket.gethostname()}"
            config.update(transactional_id=txn_id, enable_idempotence=True)
        return config

    def _use(self, scorer: Scorer) -> None:
        previous = self.scorer.version if self.scorer else None
        self.scorer = scorer
        self.codec = Codec(scorer.feature_names, self.settings.max_record_bytes)
        self.metrics.set_model(scorer.version)
        structlog.contextvars.bind_contextvars(model_version=scorer.version)  # on every log line
        self.summary.versions.append(scorer.version)
        if previous:
            self.summary.reloads += 1
            self.metrics.reloads.labels(result="swapped", reason="").inc()
        log.info(
            "model_serving", version=scorer.version, previous=previous, device=str(self.device)
        )

    def _set_partitions_held(self, n: int) -> None:
        self.partitions_held = n
        self.metrics.assigned_partitions.set(n)

    def _close_clients(self) -> None:
        consumer, self.consumer = self.consumer, None
        self._set_partitions_held(0)
        producer, self.producer = self.producer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception as e:  # closing must not hide the error that got us here
                log.warning("consumer_close_failed", error=str(e))
        if producer is not None:
            try:
                producer.close(timeout=10)
            except Exception as e:
                log.warning("producer_close_failed", error=str(e))

    def _close(self) -> None:
        self.watcher.stop()
        self._close_clients()
        if self.health:
            self.health.stop()
        s = self.summary
        log.info(
            "worker_stopped",
            records=s.records,
            rows=s.rows,
            anomalies=s.anomalies,
            rejected=s.rejected,
            batches=s.batches,
            publish_failures=s.publish_failures,
            reloads=s.reloads,
            model_version=self.scorer.version if self.scorer else None,
        )

    # -- the loop ------------------------------------------------------------------

    def _bounded_done(self) -> bool:
        s = self.settings
        if s.max_records is not None and self.summary.records >= s.max_records:
            return True
        if s.idle_timeout_s is not None and not len(self.batcher):
            # Idle means partitions held and nothing arriving: a worker joining or
            # rejoining its group (a restart waits out the dead member's session) holds
            # none and is not idle. The clock restarts at each assignment (_FlushOnRevoke).
            if not self.partitions_held:
                return False
            return time.monotonic() - self._last_records_at >= s.idle_timeout_s
        return False

    def _loop(self) -> None:
        while not self.stopping and not self._bounded_done():
            self.metrics.heartbeat()
            if self.consumer is None:
                self._connect()
                continue
            pending = self.watcher.take()
            if pending is not None:
                self.flush(reason="model swap")  # the batch in hand is scored by the model it met
                self._use(pending)
            if self.batcher.due():
                self._process(self.batcher.take())
                continue
            room = self.batcher.room()
            if self.settings.max_records is not None:
                room = min(
                    room, self.settings.max_records - self.summary.records - len(self.batcher)
                )
            wait_s = self.batcher.wait_s(IDLE_POLL_S)
            if room <= 0:  # a bounded run holds all it may take: let the batch come due
                self._stop.wait(wait_s)
                continue
            try:
                polled = self.consumer.poll(timeout_ms=int(wait_s * 1000), max_records=room)
            except KafkaError as e:
                # kafka-python can surface a connection lost mid-request from poll();
                # its state is intact and nothing was committed: wait, then poll again.
                self.metrics.set_ready(False, f"broker error: {type(e).__name__}")
                log.warning(
                    "poll_failed", error=str(e) or type(e).__name__, retry_in_s=POLL_RETRY_S
                )
                self._stop.wait(POLL_RETRY_S)
                continue
            self._update_readiness()
            if polled:
                self._last_records_at = time.monotonic()
                for records in polled.values():
                    self.batcher.add(records)

    def _update_readiness(self) -> None:
        coordinator = getattr(self.consumer, "_coordinator", None)
        unknown = coordinator is not None and coordinator.coordinator_unknown()
        if unknown:
            self.metrics.set_ready(False, "broker unreachable (no group coordinator)")
        elif not self.metrics.is_ready:
            self.metrics.set_ready(True)

    def _broker_silence(self) -> str | None:
        """Why the broker looks gone right now, or None. /readyz asks on every request,
        so an outage shows even while the loop is blocked in a flush or a commit."""
        coordinator = getattr(self.consumer, "_coordinator", None)
        if coordinator is None:
            return "not connected to the broker"
        if coordinator.coordinator_id is None:
            return "broker unreachable (no group coordinator)"
        # The group's own liveness rule: a session timeout without a heartbeat answer
        # (a stalled link, or a join that the broker never answers).
        hb = coordinator.heartbeat
        silent_s = time.monotonic() - max(hb.last_receive, hb.last_reset)
        if silent_s > self.settings.session_timeout_ms / 1000:
            return f"no answer from the group coordinator for {silent_s:.0f}s"
        return None

    def flush(self, reason: str) -> None:
        """Score, publish and commit everything in hand (revocation, swap, shutdown)."""
        while len(self.batcher) and self.consumer is not None:
            log.debug("flush", reason=reason, records=len(self.batcher))
            if not self._process(self.batcher.take()):
                break

    def _process(self, batch: list) -> bool:
        """One micro-batch end to end. Returns False when its publication failed."""
        if not batch:
            return True
        m = self.metrics
        t0 = time.perf_counter()
        decoded = self.codec.decode(batch)
        scorer = self.scorer
        emit_all = self.settings.emit == "all"
        result = None
        if len(decoded):
            result = scorer.score_batch(decoded.rows, explain="all" if emit_all else "anomalies")
        t1 = time.perf_counter()
        now_ms = int(time.time() * 1000)
        events = build_events(decoded, result, scorer, emit_all, now_ms) if result else []
        dlq = [dlq_record(r) for r in decoded.rejected]
        offsets = _next_offsets(batch)
        try:
            self._publish(events, dlq, offsets)
        except (PublishError, KafkaError) as e:
            self._recover_from_publish_failure(batch, e)
            return False
        t2 = time.perf_counter()
        log.debug(
            "batch",
            records=len(batch),
            rows=len(decoded),
            events=len(events),
            rejected=len(decoded.rejected),
            offsets={f"{tp.topic}-{tp.partition}": om.offset for tp, om in offsets.items()},
        )
        s = self.summary
        n_anom = int(result.is_anomaly.sum()) if result else 0
        s.records += len(batch)
        s.rows += len(decoded)
        s.anomalies += n_anom
        s.rejected += len(decoded.rejected)
        s.batches += 1
        m.events.inc(len(events))  # before the records: a scrape never sees rows without events
        m.records.labels(outcome="anomaly").inc(n_anom)
        m.records.labels(outcome="normal").inc(len(decoded) - n_anom)
        m.records.labels(outcome="rejected").inc(len(decoded.rejected))
        for rej in decoded.rejected:
            m.rejected.labels(reason=rej.code).inc()
        if decoded.rejected:
            first = decoded.rejected[0].record
            log.warning(
                "records_rejected",
                count=len(decoded.rejected),
                reasons=dict(Counter(r.code for r in decoded.rejected)),
                first_partition=first.partition,
                first_offset=first.offset,
                dlq=self.settings.dlq_topic,
            )
        m.batch_size.observe(len(decoded))
        m.stage.labels(stage="compute").observe(t1 - t0)
        m.stage.labels(stage="publish").observe(t2 - t1)
        _observe_latency(m, batch)
        self._observe_lag(offsets)
        if scorer.device.type == "cuda":
            import torch

            m.gpu_memory.set(torch.cuda.memory_allocated(scorer.device))
        return True

    def _publish(self, events, dlq, offsets: dict) -> None:
        s = self.settings
        p = self.producer
        if self._transactional:
            p.begin_transaction()
        try:
            futures = [p.send(s.output_topic, key=k, value=v, headers=h) for k, v, h in events]
            futures += [p.send(s.dlq_topic, key=k, value=v, headers=h) for k, v, h in dlq]
            if self._transactional:
                p.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
                p.commit_transaction()  # flushes, then commits outputs and offsets atomically
            else:
                p.flush(timeout=30)
            failed = [f for f in futures if not f.succeeded()]
            if failed:
                raise PublishError(
                    f"{len(failed)} of {len(futures)} outputs not acknowledged: {failed[0].exception}"
                )
        except BaseException:
            if self._transactional:
                try:
                    p.abort_transaction()
                except Exception as e:
                    log.warning("abort_transaction_failed", error=str(e))
            raise
        if not self._transactional:
            self.consumer.commit(offsets)

    def _recover_from_publish_failure(self, batch: list, error: Exception) -> None:
        """Nothing of the batch was committed: rewind to its first records and retry later."""
        self.summary.publish_failures += 1
        self.metrics.publish_failures.inc()
        firsts: dict[TopicPartition, int] = {}
        # Records polled after the batch are dropped too: the rewind fetches them again.
        for rec in batch + self.batcher.clear():
            tp = TopicPartition(rec.topic, rec.partition)
            firsts[tp] = min(firsts.get(tp, rec.offset), rec.offset)
        log.error(
            "publish_failed",
            error=str(error) or type(error).__name__,
            records=len(batch),
            rewound={f"{tp.topic}-{tp.partition}": off for tp, off in firsts.items()},
            action="nothing committed; retrying from the first uncommitted records",
        )
        assigned = self.consumer.assignment()
        for tp, off in firsts.items():
            if tp in assigned:
                self.consumer.seek(tp, off)
        self._stop.wait(1.0)

    def _observe_lag(self, offsets: dict) -> None:
        for tp, om in offsets.items():
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, high - om.offset)
                )


def _next_offsets(batch: list) -> dict[TopicPartition, OffsetAndMetadata]:
    last: dict[tuple[str, int], int] = {}
    for rec in batch:
        key = (rec.topic, rec.partition)
        if rec.offset >= last.get(key, -1):
            last[key] = rec.offset
    return {TopicPartition(t, p): OffsetAndMetadata(o + 1, "", -1) for (t, p), o in last.items()}


def _observe_latency(m: WorkerMetrics, batch: list, samples: int = 32) -> None:
    """End-to-end latency of a sample of the batch's records (evenly spaced)."""
    now_ms = time.time() * 1000
    step = max(1, len(batch) // samples)
    stamps = np.fromiter((r.timestamp for r in batch[::step]), dtype=np.float64)
    for lat in (now_ms - stamps[stamps > 0]) / 1000:
        m.latency.observe(max(0.0, lat))
