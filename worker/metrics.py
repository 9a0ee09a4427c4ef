"""Prometheus metrics and the /healthz, /readyz endpoints on WORKER_METRICS_PORT.

The HTTP server answers exactly three paths and nothing else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
            "cae_gpu_memory_bytes", "GPU memory allocated by the worker", registry=r
        )
        self.ready = Gauge(
            "cae_ready", "1 when the worker can score and reach the broker", registry=r
        )
        self.assigned_partitions = Gauge(
            "cae_assigned_partitions", "Input partitions this worker holds", registry=r
        )
        self.last_loop = time.monotonic()
        self.is_ready = False
        self.not_ready_reason = "starting"
        # Asked by /readyz on every request once the loop has declared itself ready:
        # returns why the broker looks gone right now, or None.
        self.readiness_probe: Callable[[], str | None] | None = None

    def set_model(self, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version=version).set(1)

    def heartbeat(self) -> None:
        self.last_loop = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.is_ready = ready
        self.not_ready_reason = reason
        self.ready.set(1 if ready else 0)


class HealthServer:
    """/metrics, /healthz (the loop is alive), /readyz (model loaded, broker reachable)."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int, stale_after_s: float = 60.0):
        self.metrics = metrics
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                code, body, ctype = owner.respond(self.path)
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # silence per-request stderr lines
                pass

        self.stale_after_s = stale_after_s
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="health-http", daemon=True
        )

    def respond(self, path: str) -> tuple[int, bytes, str]:
        path = path.split("?", 1)[0]
        m = self.metrics
        if path == "/metrics":
            return 200, generate_latest(m.registry), CONTENT_TYPE_LATEST
        if path == "/healthz":
            age = time.monotonic() - m.last_loop
            if age <= self.stale_after_s:
                return 200, b"ok\n", "text/plain"
            return 503, f"loop stalled for {age:.0f}s\n".encode(), "text/plain"
        if path == "/readyz":
            reason = m.not_ready_reason if not m.is_ready else None
            if reason is None and m.readiness_probe is not None:
                reason = m.readiness_probe()
            if reason is None:
                return 200, b"ready\n", "text/plain"
            return 503, f"not ready: {reason}\n".encode(), "text/plain"
        return 404, b"not found\n", "text/plain"

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
