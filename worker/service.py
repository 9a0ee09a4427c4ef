"""The worker loop: poll → micro-batch → score (worker/step.py) → submit → settle → count.

A batch's outputs are in flight while the next batch is polled and scored.
Offsets are committed only for records whose events and DLQ records the broker
acknowledged, in order (at-least-once), or inside the same transaction
(exactly-once); see worker/delivery.py and docs/contract.md#delivery-guarantees.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import structlog
import torch
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from worker.allocator import freeze_survivors
from worker.batcher import MicroBatcher
from worker.bounds import RunBounds
from worker.clients import KafkaClients, open_clients
from worker.codec import Codec
from worker.delivery import Settled, delivery_for, rewind
from worker.drift import DriftMonitor
from worker.executors import gpu_memory, release_cached_memory
from worker.health import Health, HealthServer, broker_silence
from worker.incident_state import incident_tracker, restore_incidents
from worker.metrics import WorkerMetrics
from worker.reload import CheckpointWatcher, source_for
from worker.scoring import Scorer, resolve_device
from worker.settings import WorkerSettings
from worker.shadow import Rollout, Verdict
from worker.step import BatchOutcome, first_offsets, score_records

log = structlog.get_logger("worker")

IDLE_POLL_S = 0.2
# While outputs are in flight the poll returns this soon, so acknowledged batches
# are committed promptly even when no record arrives.
IN_FLIGHT_POLL_S = 0.02
POLL_RETRY_S = 0.5
PUBLISH_RETRY_S = 1.0
MAX_CONNECT_BACKOFF_S = 15.0

OpenClients = Callable[[WorkerSettings, ConsumerRebalanceListener, dict], KafkaClients]


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

    def add(self, outcome: BatchOutcome) -> None:
        self.records += len(outcome.records)
        self.rows += outcome.rows
        self.anomalies += outcome.anomalies
        self.rejected += len(outcome.rejected)
        self.batches += 1


class RebalanceListener(ConsumerRebalanceListener):
    """Finishes the batch in hand and everything in flight, and commits, before
    partitions go; reports what is held.

    kafka-python still lists revoked partitions in assignment() while the group
    rebalances, so they are taken out here: a rejoining worker holds nothing.
    """

    def __init__(self, consumer_assignment: Callable[[], set], worker: Worker):
        self.assignment = consumer_assignment
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        self.worker.flush(reason="revoked")
        self.worker.partitions_changed(set(self.assignment()) - set(revoked))

    def on_partitions_assigned(self, assigned):
        self.worker.partitions_changed(set(self.assignment()), assigned=set(assigned))


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        metrics: WorkerMetrics | None = None,
        open_clients: OpenClients = open_clients,
        freeze_gc: bool = False,
    ):
        self.settings = settings
        # the process's own worker (python -m worker): after start-up and each swap,
        # freeze what survives (worker/allocator.py); not in a test's process
        self.freeze_gc = freeze_gc
        self.metrics = metrics or WorkerMetrics()
        self.health = Health(self.metrics)
        self.device = resolve_device(settings.device)
        torch.set_num_threads(settings.torch_threads)
        self.summary = RunSummary()
        self.scorer: Scorer | None = None
        self.codec: Codec | None = None
        self.clients: KafkaClients | None = None
        self.delivery = delivery_for(settings)
        self.incidents = incident_tracker(settings)
        self.batcher = MicroBatcher.of(settings)
        self.bounds = RunBounds(settings.max_records, settings.idle_timeout_s)
        self.watcher = CheckpointWatcher(
            source_for(settings),
            self.device,
            settings.precision,
            settings.reload_poll_s,
            self.metrics,
            cuda_graphs=settings.cuda_graphs,
            top_k=settings.top_features,
        )
        self.health.components_alive = lambda: self.watcher.alive
        self.rollout = Rollout(
            settings.shadow_records, settings.shadow_max_rate_factor, self.metrics
        )
        self.health.shadow_request = self.rollout.request
        self.drift = (
            DriftMonitor(
                settings.drift_window,
                settings.drift_level,
                settings.drift_resolve_level,
                settings.drift_max_anomaly_share,
                top_features=settings.top_features,
                instance=settings.transactional_id or socket.gethostname(),
            )
            if settings.drift_window
            else None
        )
        self._open_clients = open_clients
        self._carried: list = []  # outputs a rewind handed back, for the next batch
        self._last_poll_s: float | None = None  # when the last poll returned (batcher clock)
        self._stop = threading.Event()
        self._server: HealthServer | None = None

    # -- lifecycle ---------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        """Signal handlers call this: it only flips a flag; the loop drains."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> RunSummary:
        try:
            if self._start():
                self._freeze_survivors("start-up")
                self._loop()
                self.flush(reason="shutdown")
        finally:
            self._close()
        return self.summary

    def _start(self) -> bool:
        s = self.settings
        if s.metrics_port:
            self._server = HealthServer(
                self.health, s.metrics_host, s.metrics_port, admin_token=s.admin_token
            ).start()
        self.health.set_ready(False, "waiting for a model")
        scorer = self.watcher.wait_for_first(s.wait_for_model_s, self._stop, self.health.beat)
        if scorer is None:
            if self.stopping:
                return False
            raise StartupError(
                f"no valid model in {self.watcher.where} after {s.wait_for_model_s:.0f}s "
                "(train one: python -m training --data FILE --out DIR)"
            )
        self._serve(scorer)
        self.watcher.start()
        self.health.set_ready(False, "connecting to the broker")
        self.health.broker_probe = self._broker_silence
        self._connect()
        return not self.stopping

    def _connect(self) -> None:
        s = self.settings
        delay = 0.5
        while not self.stopping:
            # alive while waiting for the broker: /healthz stays 200 (no container
            # restart loop), /readyz says not ready
            self.health.beat()
            try:
                clients = self._open()
            except (KafkaError, OSError) as e:
                log.warning(
                    "broker_unreachable",
                    bootstrap=s.kafka.bootstrap_servers,
                    error=str(e) or type(e).__name__,
                    retry_in_s=delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_CONNECT_BACKOFF_S)
                continue
            self.clients = clients
            log.info(
                "connected",
                bootstrap=s.kafka.bootstrap_servers,
                input=s.input_topic,
                group=s.group_id,
                delivery=s.delivery,
                device=str(self.device),
            )
            return

    def _open(self) -> KafkaClients:
        """One connection attempt: clients ready for this worker's delivery strategy."""
        listener = RebalanceListener(self._assignment, self)
        clients = self._open_clients(self.settings, listener, self.delivery.producer_options())
        try:
            self.delivery.prepare(clients.producer)
        except BaseException:
            clients.close()
            raise
        return clients

    def _close(self) -> None:
        self.watcher.stop()
        clients, self.clients = self.clients, None
        if clients is not None:
            clients.close()
        self.partitions_changed(set())
        if self._server:
            self._server.stop()
        log.info(
            "worker_stopped",
            **asdict(self.summary),
            model_version=self.scorer.version if self.scorer else None,
            drift=self.drift.summary() if self.drift is not None else None,
        )

    # -- model and partitions (the loop thread, and the rebalance listener inside poll) --

    def _serve(self, scorer: Scorer) -> None:
        previous = self.scorer.version if self.scorer else None
        self.scorer = scorer
        self.codec = Codec(scorer.feature_names, self.settings.max_record_bytes)
        self.metrics.set_model(scorer.version)
        if scorer.device.type == "cuda":
            if previous:  # the old scorer is gone: its graph pools go back to the driver
                release_cached_memory()
            self.metrics.set_gpu_memory(gpu_memory(scorer.device, graph_pools=True))
        structlog.contextvars.bind_contextvars(model_version=scorer.version)  # on every log line
        self.summary.versions.append(scorer.version)
        if self.drift is not None:
            self.drift.model_changed(scorer.manifest)
        if previous:
            self.summary.reloads += 1
            self.metrics.reloads.labels(result="swapped", reason="").inc()
        log.info(
            "model_serving", version=scorer.version, previous=previous, device=str(self.device)
        )

    def _freeze_survivors(self, reason: str) -> None:
        if not self.freeze_gc:
            return
        t = time.perf_counter()
        frozen = freeze_survivors()
        log.debug(
            "gc_frozen", reason=reason, objects=frozen, ms=round(1e3 * (time.perf_counter() - t))
        )

    def _next_model(self) -> Scorer | None:
        """The model to swap in now, if any: a new checkpoint from the watcher (at once,
        or once its shadow run promotes it: worker/shadow.py)."""
        pending = self.watcher.take()
        if pending is not None:
            pending = self.rollout.offer(pending, self.scorer)
        decided = self.rollout.decide()
        if decided is None:
            return pending
        candidate, verdict = decided
        return self._apply_verdict(candidate, verdict) or pending

    def _apply_verdict(self, candidate: Scorer, verdict: Verdict) -> Scorer | None:
        if verdict.promote:
            log.info(
                "shadow_promoted",
                version=candidate.version,
                by=verdict.decided_by,
                detail=verdict.detail,
            )
            return candidate
        self.watcher.refused[candidate.version] = verdict.reason
        self.metrics.reloads.labels(result="refused", reason=verdict.reason).inc()
        log.error(
            "model_refused",
            version=candidate.version,
            reason=verdict.reason,
            detail=verdict.detail,
            by=verdict.decided_by,
            action="keeping the serving model",
        )
        return None

    def partitions_changed(self, held: set, assigned: set | None = None) -> None:
        """The rebalance listener reports the partitions held now (and, on an
        assignment, what the group gave: the idle clock restarts)."""
        self.bounds.held(len(held), assigned=assigned is not None)
        self.metrics.assigned_partitions.set(len(held))
        if self.incidents is not None:  # after the flush: what was delivered is in the changelog
            mine = {tp.partition for tp in held if tp.topic == self.settings.input_topic}
            self.incidents.drop_partitions(self.incidents.partitions() - mine)
            if assigned and self.settings.incident_state_on:
                new = sorted(
                    tp.partition for tp in assigned if tp.topic == self.settings.input_topic
                )
                restore_incidents(self.incidents, self.settings, self.metrics, new)
        if assigned is not None:
            log.info(
                "partitions_assigned",
                partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in assigned),
            )

    def _assignment(self) -> set:
        return self.clients.consumer.assignment() if self.clients else set()

    def flush(self, reason: str) -> None:
        """Score and send everything in hand, wait for every output, commit synchronously
        (revocation, swap, shutdown)."""
        if self.clients is None:
            return
        log.debug("flush", reason=reason, records=len(self.batcher), in_flight=self._in_flight())
        while len(self.batcher):
            if not self._process(self.batcher.take()):
                return
        self._settle(wait="all")

    def _in_flight(self) -> int:
        """Records polled and not yet committed: in the batcher or delivering."""
        return len(self.batcher) + self.delivery.in_flight()

    # -- the loop ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping and not self.bounds.done(self.summary.records, self._in_flight()):
            self.health.beat()
            if self.clients is None:
                self._connect()
                continue
            pending = self._next_model()
            if pending is not None:
                self.flush(reason="model swap")  # the batch in hand is scored by the model it met
                self._serve(pending)
                self._freeze_survivors("model swap")
            if not self._settle():
                continue
            if self.batcher.due():
                self._process(self.batcher.take())
            else:
                self._poll()

    def _poll(self) -> None:
        room = self.batcher.room()
        bounded = self.bounds.room(self.summary.records, self._in_flight())
        # Never block longer than IDLE_POLL_S, even for a batch that is due much later
        # (a long WORKER_MAX_BATCH_WAIT_MS): a stop request is honoured within that.
        wait_s = min(self.batcher.wait_s(IDLE_POLL_S), IDLE_POLL_S)
        due_in = self.delivery.due_in_s()
        if due_in is not None:
            wait_s = min(wait_s, max(due_in, IN_FLIGHT_POLL_S))
        if bounded is not None and bounded <= 0:  # a bounded run holds all it may take
            self._stop.wait(wait_s)
            return
        if bounded is not None:
            room = min(room, bounded)
        try:
            polled = self.clients.consumer.poll(timeout_ms=int(wait_s * 1000), max_records=room)
        except KafkaError as e:
            # kafka-python can surface a connection lost mid-request from poll();
            # its state is intact and nothing was committed: wait, then poll again.
            self.health.set_ready(False, f"broker error: {type(e).__name__}")
            log.warning("poll_failed", error=str(e) or type(e).__name__, retry_in_s=POLL_RETRY_S)
            self._stop.wait(POLL_RETRY_S)
            return
        # the loop was deaf from the previous poll's return until this poll: what this
        # one brought could have been received since then (worker/batcher.py)
        since, self._last_poll_s = self._last_poll_s, self.batcher.clock()
        silence = self._broker_silence()
        self.health.set_ready(silence is None, silence or "")
        if polled:
            self.bounds.arrived()
            for records in polled.values():
                self.batcher.add(records, since)

    def _broker_silence(self) -> str | None:
        consumer = self.clients.consumer if self.clients else None
        return broker_silence(consumer, self.settings.session_timeout_ms / 1000)

    def _process(self, records: list) -> bool:
        """Score one micro-batch and send its outputs, once there is room in flight.
        Returns False when a delivery failed (and the consumer was rewound)."""
        if not records:
            return True
        outcome = score_records(
            records,
            self.codec,
            self.scorer,
            self.settings.emit == "all",
            tracker=self.incidents,
            with_state=self.settings.incident_state_on,
        )
        self._observe(outcome)
        if not self._settle(wait="room", unsent=outcome):
            return False
        try:
            self.delivery.submit(outcome, self.clients.producer, self.clients.consumer)
        except KafkaError as e:
            self._rewind(e, unsent=outcome)
            return False
        return True

    def _observe(self, outcome: BatchOutcome) -> None:
        """What watches the serving model's results sees the batch: the candidate in
        shadow scores it too, and a drift incident that opens or resolves goes out with
        the batch's outputs."""
        scored, outcome.scored = outcome.scored, None  # not kept while in flight
        outcome.drift, self._carried = self._carried, []
        if scored is not None:
            self.rollout.observe(scored.vectors, scored.scores, outcome.compute_s)
        if scored is not None and self.drift is not None:
            outcome.drift += self._watch_drift(scored)

    def _watch_drift(self, scored) -> list:
        """The batch's p-values to the drift monitor; the drift incidents to send."""
        out = []
        topic = self.settings.input_topic
        now_ms = int(time.time() * 1000)
        for t in self.drift.observe(topic, scored.scores.p_values, scored.vectors, now_ms):
            self.metrics.drift_incidents.labels(topic=t.topic, status=t.status).inc()
            log.warning(
                "drift_opened" if t.status == "open" else "drift_resolved",
                topic=t.topic,
                incident_id=t.incident_id,
                statistic=round(self.drift.topics[topic].statistic, 2),
                anomaly_share=round(self.drift.topics[topic].anomaly_share, 4),
                features=self.drift.moved_features(self.drift.topics[topic]),
            )
            if self.settings.incidents_on:
                out.append(t.output)
        state = self.drift.topics[topic]
        if state.tested:
            self.metrics.drift_statistic.labels(topic=topic).set(state.statistic)
            self.metrics.drift_anomaly_share.labels(topic=topic).set(state.anomaly_share)
        self.metrics.drift_open.labels(topic=topic).set(1 if state.open else 0)
        return out

    def _settle(self, wait: str = "none", unsent: BatchOutcome | None = None) -> bool:
        """Count and commit what finished delivering; on a failure, rewind.
        Returns False when a delivery failed."""
        clients = self.clients
        try:
            settled = self.delivery.settle(clients.producer, clients.consumer, wait)
        except KafkaError as e:  # e.g. a flush that timed out: nothing was committed
            settled = Settled(error=e)
        for finished in settled.finished:
            self._count(finished.outcome, finished.publish_s)
        if settled.error is not None:
            self._rewind(settled.error, unsent)
            return False
        return True

    def _rewind(self, error: Exception, unsent: BatchOutcome | None) -> None:
        """Nothing from the failed batch on was committed: drop everything in flight and
        in hand, rewind to the first uncommitted records and retry after a pause. What
        the delivery hands back (worker/pipeline.py `Abandoned`) is the rule: its records
        are read again, so the state derived from them rolls back (the incident tracker,
        to the last delivered batch), and its carried outputs go with the next batch."""
        self.summary.publish_failures += 1
        self.metrics.publish_failures.inc()
        abandoned = self.delivery.abandon(self.clients.producer)
        if unsent is not None:  # scored, never handed to the delivery
            abandoned.records += unsent.records
            abandoned.carried += unsent.drift
        dropped = abandoned.records + self.batcher.clear()
        if self.incidents is not None:
            self.incidents.rollback()
        self._carried += abandoned.carried
        firsts = first_offsets(dropped)
        log.error(
            "publish_failed",
            error=str(error) or type(error).__name__,
            records=len(dropped),
            rewound={f"{tp.topic}-{tp.partition}": off for tp, off in firsts.items()},
            action="nothing committed; retrying from the first uncommitted records",
        )
        rewind(self.clients.consumer, firsts)
        self._stop.wait(PUBLISH_RETRY_S)

    def _count(self, outcome: BatchOutcome, publish_s: float) -> None:
        consumer = self.clients.consumer
        lag = {}
        for tp, om in outcome.offsets.items():
            high = consumer.highwater(tp)
            if high is not None:
                lag[tp] = max(0, high - om.offset)
        self.summary.add(outcome)
        self.metrics.observe(outcome, publish_s, lag)
        if self.incidents is not None:
            self.incidents.settled()
            self.metrics.incident_keys.set(len(self.incidents.states))
            self.metrics.incidents_open.set(self.incidents.open_incidents())
            if self.incidents.repeats is not None:
                self.metrics.stuck_keys.set(len(self.incidents.repeats))
        if self.scorer.device.type == "cuda":
            self.metrics.set_gpu_memory(gpu_memory(self.scorer.device))
        log.debug(
            "batch",
            records=len(outcome.records),
            rows=outcome.rows,
            events=len(outcome.events),
            rejected=len(outcome.rejected),
            offsets={f"{tp.topic}-{tp.partition}": om.offset for tp, om in outcome.offsets.items()},
        )
        if outcome.rejected:
            first = outcome.rejected[0].record
            log.warning(
                "records_rejected",
                count=len(outcome.rejected),
                reasons=dict(Counter(r.code for r in outcome.rejected)),
                first_partition=first.partition,
                first_offset=first.offset,
                dlq=self.settings.dlq_topic,
            )
