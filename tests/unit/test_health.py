"""/readyz asks the worker's readiness probe on every request, so an outage shows even
while the loop is blocked (in a flush, a commit) and cannot update its own flag."""

from __future__ import annotations

from worker.metrics import HealthServer, WorkerMetrics


def _server(metrics: WorkerMetrics) -> HealthServer:
    server = HealthServer(metrics, "127.0.0.1", 0)
    server.server.server_close()  # respond() is all we need; no socket kept open
    return server


def test_readyz_reports_the_probe_reason_while_the_loop_thinks_it_is_ready():
    m = WorkerMetrics()
    server = _server(m)
    assert server.respond("/readyz")[0] == 503  # starting
    m.set_ready(True)
    assert server.respond("/readyz")[:2] == (200, b"ready\n")
    outage = {"reason": "no answer from the group coordinator for 7s"}
    m.readiness_probe = lambda: outage["reason"]
    code, body, _ = server.respond("/readyz")
    assert code == 503 and b"no answer from the group coordinator" in body
    outage["reason"] = None
    assert server.respond("/readyz")[0] == 200


def test_loop_reason_wins_over_the_probe():
    m = WorkerMetrics()
    m.readiness_probe = lambda: None
    m.set_ready(False, "waiting for a model")
    code, body, _ = _server(m).respond("/readyz")
    assert code == 503 and b"waiting for a model" in body
