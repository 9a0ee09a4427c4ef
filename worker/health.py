"""Health in one place: liveness, readiness, the broker probe and the HTTP server.

* **/healthz** (liveness, the container's HEALTHCHECK): the loop beat within
  `stale_after_s` and the checkpoint watcher is running. Waiting for a model or for
  the broker beats too: a worker that waits is alive, and restarting it would not help.
* **/readyz** (readiness): a model is serving, the worker is connected, and the broker
  answers. The loop sets its own reason (`set_ready`); the broker probe is asked on
  every request as well, so an outage shows even while the loop is blocked in a
  flush or a commit.
* **/metrics**: Prometheus text from the worker's registry.
* **POST /shadow** (only when an admin token is set): an operator promotes or refuses
  the checkpoint in shadow (worker/shadow.py), with `Authorization: Bearer TOKEN`.

The server answers exactly these paths and nothing else.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import SecretStr

from worker.metrics import WorkerMetrics


class Health:
    """The worker's liveness and readiness state, shared by the loop and the server."""

    def __init__(self, metrics: WorkerMetrics, stale_after_s: float = 60.0):
        self.metrics = metrics
        self.stale_after_s = stale_after_s
        self.last_beat = time.monotonic()
        self.ready = False
        self.not_ready_reason = "starting"
        # Asked on every /readyz once the loop says it is ready: why the broker looks
        # gone right now, or None (see broker_silence).
        self.broker_probe: Callable[[], str | None] = lambda: None
        # Whether the background parts the loop depends on still run (the checkpoint
        # watcher): a dead one is a dead worker, whatever the loop's heartbeat says.
        self.components_alive: Callable[[], bool] = lambda: True
        # An operator's decision on the checkpoint in shadow: (action, version) →
        # (HTTP status, message).
        self.shadow_request: Callable[[str, str], tuple[int, str]] = lambda a, v: (
            409,
            "nothing in shadow",
        )

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.ready = ready
        self.not_ready_reason = reason
        self.metrics.ready.set(1 if ready else 0)

    def liveness(self) -> str | None:
        """Why the worker is not alive, or None."""
        age = time.monotonic() - self.last_beat
        if age > self.stale_after_s:
            return f"loop stalled for {age:.0f}s"
        if not self.components_alive():
            return "checkpoint watcher stopped"
        return None

    def readiness(self) -> str | None:
        """Why the worker is not ready, or None."""
        if not self.ready:
            return self.not_ready_reason
        return self.broker_probe()


def broker_silence(consumer, session_timeout_s: float) -> str | None:
    """Why the broker looks gone to this consumer right now, or None.

    kafka-python has no public view of its group coordinator, so this is the one
    place that reads the consumer's private `_coordinator`: no coordinator known, or
    a session timeout without a heartbeat answer (a stalled link, or a join that the
    broker never answers) — the group's own liveness rule.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None:
        return "not connected to the broker"
    # coordinator_id only: /readyz asks from the HTTP thread, and coordinator_unknown()
    # would mark the coordinator dead (client state) from there; the loop's own poll
    # does that, and resets coordinator_id, when the connection fails.
    if coordinator.coordinator_id is None:
        return "broker unreachable (no group coordinator)"
    hb = coordinator.heartbeat
    silent_s = time.monotonic() - max(hb.last_receive, hb.last_reset)
    if silent_s > session_timeout_s:
        return f"no answer from the group coordinator for {silent_s:.0f}s"
    return None


MAX_POST_BYTES = 1024


class HealthServer:
    """/metrics, /healthz and /readyz over HTTP, in a daemon thread."""

    def __init__(self, health: Health, host: str, port: int, admin_token: SecretStr | None = None):
        self.health = health
        self.admin_token = admin_token.get_secret_value().encode() if admin_token else None
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self._reply(*owner.respond(self.path))

            def do_POST(self):  # noqa: N802 - http.server's name
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_POST_BYTES:
                    code, body = 400, b"a form of at most 1024 bytes, with its Content-Length\n"
                else:
                    code, body = owner.post(
                        self.path, self.headers.get("Authorization"), self.rfile.read(length)
                    )
                self._reply(code, body, "text/plain")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    # the client hung up before its answer (a probe's timeout): nothing
                    # to answer, and no traceback on stderr from socketserver
                    self.close_connection = True

            def log_message(self, *args):  # silence per-request stderr lines
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="health-http", daemon=True
        )

    def respond(self, path: str) -> tuple[int, bytes, str]:
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, generate_latest(self.health.metrics.registry), CONTENT_TYPE_LATEST
        if path == "/healthz":
            reason = self.health.liveness()
            if reason is None:
                return 200, b"ok\n", "text/plain"
            return 503, f"{reason}\n".encode(), "text/plain"
        if path == "/readyz":
            reason = self.health.readiness()
            if reason is None:
                return 200, b"ready\n", "text/plain"
            return 503, f"not ready: {reason}\n".encode(), "text/plain"
        return 404, b"not found\n", "text/plain"

    def post(self, path: str, authorization: str | None, body: bytes) -> tuple[int, bytes]:
        """POST /shadow: an operator's promote/refuse, with the admin token."""
        if path.split("?", 1)[0] != "/shadow" or self.admin_token is None:
            return 404, b"not found\n"
        given = (authorization or "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, b"Bearer " + self.admin_token):
            return 401, b"unauthorized\n"
        try:
            form = parse_qs(body.decode("utf-8"), strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return 400, b"expected a form: action=promote|refuse&version=VERSION\n"
        action, version = form.get("action", [""]), form.get("version", [""])
        if len(action) != 1 or len(version) != 1 or not version[0]:
            return 400, b"expected a form: action=promote|refuse&version=VERSION\n"
        code, message = self.health.shadow_request(action[0], version[0])
        return code, f"{message}\n".encode()

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
