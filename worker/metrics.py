"""The worker's Prometheus metrics (served by worker/health.py on WORKER_METRICS_PORT)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.step import BatchOutcome, latency_sample

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (1, 8, 32, 128, 512, 1024, 4096, 16384, 65536)


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.records = Counter("cae_records", "Input rows by outcome", ["outcome"], registry=r)
        self.rejected = Counter(
            "cae_rejected_records", "Records sent to the DLQ, by reason", ["reason"], registry=r
        )
        self.events = Counter(
            "cae_events_published", "Events acknowledged by the broker", registry=r
        )
        self.batch_size = Histogram(
            "cae_batch_rows", "Rows per micro-batch", buckets=_SIZE_BUCKETS, registry=r
        )
        self.stage = Histogram(
            "cae_stage_seconds",
            "Time per batch in each stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "cae_end_to_end_latency_seconds",
            "Record timestamp to broker acknowledgement of its event",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "cae_consumer_lag",
            "Records behind the high watermark",
            ["topic", "partition"],
            registry=r,
        )
        self.model_info = Gauge(
            "cae_model_info", "The model version serving (value 1)", ["version"], registry=r
        )
        self.reloads = Counter(
            "cae_model_reloads",
            "Checkpoint reload attempts by result",
            ["result", "reason"],
            registry=r,
        )
        self.publish_failures = Counter(
            "cae_publish_failures", "Batches whose publication failed (not committed)", registry=r
        )
        self.gpu_memory = Gauge(
            "cae_gpu_memory_bytes",
            "GPU memory of the worker by kind: allocated (live tensors), reserved (held by "
            "the caching allocator, CUDA graph pools included), graph_pools (of reserved, "
            "the CUDA graph pools; set on each model swap)",
            ["kind"],
            registry=r,
        )
        self.ready = Gauge(
            "cae_ready", "1 when the worker can score and reach the broker", registry=r
        )
        self.assigned_partitions = Gauge(
            "cae_assigned_partitions", "Input partitions this worker holds", registry=r
        )
        self.incidents = Counter(
            "cae_incidents",
            "Incident transitions delivered (opened, resolved; evicted: resolved by eviction)",
            ["transition"],
            registry=r,
        )
        self.incident_keys = Gauge(
            "cae_incident_keys", "Keys with incident state (held partitions)", registry=r
        )
        self.incidents_open = Gauge("cae_incidents_open", "Open incidents", registry=r)
        self.stuck_keys = Gauge(
            "cae_stuck_watch_keys", "Keys whose last row the stuck-feature check holds", registry=r
        )
        self.incident_state_restored = Counter(
            "cae_incident_state_restored_records",
            "Changelog records read back on partition assignment",
            registry=r,
        )
        self.incident_restore = Histogram(
            "cae_incident_restore_seconds",
            "Time to read back the incident state of newly assigned partitions",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        # drift (worker/drift.py), per input topic
        self.drift_statistic = Gauge(
            "cae_drift_statistic",
            "Fit test of the serving model's p-values over the last window (|T| ≥ level opens)",
            ["topic"],
            registry=r,
        )
        self.drift_anomaly_share = Gauge(
            "cae_drift_anomaly_share",
            "Share of the last window's rows with a p-value at most the target rate",
            ["topic"],
            registry=r,
        )
        self.drift_open = Gauge(
            "cae_drift_open", "1 while a drift incident is open", ["topic"], registry=r
        )
        self.drift_incidents = Counter(
            "cae_drift_incidents",
            "Drift incidents by status (open, resolved)",
            ["topic", "status"],
            registry=r,
        )
        # shadow rollout (worker/shadow.py): the candidate scored beside the serving model
        self.shadow_info = Gauge(
            "cae_shadow_info", "The checkpoint in shadow (value 1), if any", ["version"], registry=r
        )
        self.shadow_records = Gauge(
            "cae_shadow_records", "Rows the candidate in shadow has scored", registry=r
        )
        self.shadow_anomaly_rate = Gauge(
            "cae_shadow_anomaly_rate", "The candidate's anomaly rate on live rows", registry=r
        )
        self.shadow_target_rate = Gauge(
            "cae_shadow_target_rate", "The candidate's target false-positive rate", registry=r
        )
        self.shadow_agreement = Gauge(
            "cae_shadow_agreement",
            "Share of live rows where the candidate and the serving model decide alike",
            registry=r,
        )
        self.shadow_rank_correlation = Gauge(
            "cae_shadow_rank_correlation",
            "Spearman correlation of the candidate's and the serving model's scores",
            registry=r,
        )
        self.shadow_cost_ratio = Gauge(
            "cae_shadow_cost_ratio",
            "The candidate's scoring time over the serving batch's compute time",
            registry=r,
        )

    def set_model(self, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version=version).set(1)

    def set_gpu_memory(self, by_kind: dict[str, int]) -> None:
        """cae_gpu_memory_bytes{kind} from worker.executors.gpu_memory()."""
        for kind, value in by_kind.items():
            self.gpu_memory.labels(kind=kind).set(value)

    def observe(self, outcome: BatchOutcome, publish_s: float, lag: dict) -> None:
        """Count one delivered batch (`lag`: records behind per TopicPartition)."""
        n_normal = outcome.rows - outcome.anomalies
        self.events.inc(len(outcome.events))  # first: a scrape never sees rows without events
        self.records.labels(outcome="anomaly").inc(outcome.anomalies)
        self.records.labels(outcome="normal").inc(n_normal)
        self.records.labels(outcome="rejected").inc(len(outcome.rejected))
        for rej in outcome.rejected:
            self.rejected.labels(reason=rej.code).inc()
        self.batch_size.observe(outcome.rows)
        self.stage.labels(stage="compute").observe(outcome.compute_s)
        self.stage.labels(stage="publish").observe(publish_s)
        for seconds in latency_sample(outcome.records, time.time() * 1000):
            self.latency.observe(seconds)
        if outcome.tracked is not None:
            t = outcome.tracked
            self.incidents.labels(transition="opened").inc(t.opened)
            self.incidents.labels(transition="resolved").inc(t.resolved)
            self.incidents.labels(transition="evicted").inc(t.evicted)
        for tp, behind in lag.items():
            self.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(behind)
