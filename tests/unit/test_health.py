"""Liveness and readiness: /readyz asks the broker probe on every request, so an outage
shows even while the loop is blocked (in a flush, a commit) and cannot update its own
flag; /healthz fails when the loop stalls or the checkpoint watcher has died."""

from __future__ import annotations

from types import SimpleNamespace

from worker.health import Health, HealthServer, broker_silence
from worker.metrics import WorkerMetrics


def _server(health: Health) -> HealthServer:
    server = HealthServer(health, "127.0.0.1", 0)
    server.server.server_close()  # respond() is all we need; no socket kept open
    return server


def _ready_gauge(health: Health) -> float:
    return health.metrics.registry.get_sample_value("cae_ready")


def test_readyz_reports_the_probe_reason_while_the_loop_thinks_it_is_ready():
    health = Health(WorkerMetrics())
    server = _server(health)
    assert server.respond("/readyz")[0] == 503  # starting
    health.set_ready(True)
    assert server.respond("/readyz")[:2] == (200, b"ready\n")
    assert _ready_gauge(health) == 1
    outage = {"reason": "no answer from the group coordinator for 7s"}
    health.broker_probe = lambda: outage["reason"]
    code, body, _ = server.respond("/readyz")
    assert code == 503 and b"no answer from the group coordinator" in body
    outage["reason"] = None
    assert server.respond("/readyz")[0] == 200


def test_loop_reason_wins_over_the_probe():
    health = Health(WorkerMetrics())
    health.set_ready(False, "waiting for a model")
    code, body, _ = _server(health).respond("/readyz")
    assert code == 503 and b"waiting for a model" in body
    assert _ready_gauge(health) == 0


def test_healthz_fails_when_the_loop_stalls():
    health = Health(WorkerMetrics(), stale_after_s=60)
    server = _server(health)
    assert server.respond("/healthz")[0] == 200
    health.last_beat -= 61
    code, body, _ = server.respond("/healthz")
    assert code == 503 and b"loop stalled" in body
    health.beat()
    assert server.respond("/healthz")[0] == 200


def test_healthz_fails_when_the_checkpoint_watcher_died():
    health = Health(WorkerMetrics())
    alive = {"watcher": True}
    health.components_alive = lambda: alive["watcher"]
    server = _server(health)
    assert server.respond("/healthz")[0] == 200
    alive["watcher"] = False
    code, body, _ = server.respond("/healthz")
    assert code == 503 and b"checkpoint watcher stopped" in body


def _consumer(coordinator_id, last_receive: float, last_reset: float):
    heartbeat = SimpleNamespace(last_receive=last_receive, last_reset=last_reset)
    coordinator = SimpleNamespace(coordinator_id=coordinator_id, heartbeat=heartbeat)
    return SimpleNamespace(_coordinator=coordinator)


def test_broker_silence_reads_the_group_coordinator(monkeypatch):
    monkeypatch.setattr("worker.health.time.monotonic", lambda: 100.0)
    assert broker_silence(None, 10) == "not connected to the broker"
    assert "no group coordinator" in broker_silence(_consumer(None, 99, 0), 10)
    assert broker_silence(_consumer(1, 95, 0), 10) is None
    assert "for 15s" in broker_silence(_consumer(1, 85, 0), 10)
    assert broker_silence(_consumer(1, 0, 95), 10) is None, "a reset counts as an answer"


def test_a_client_that_hangs_up_before_its_answer_leaves_no_traceback(capfd):
    """A probe that times out closes its connection while the answer is being made; the
    write then fails (reset by peer). That is the client's business: no traceback on the
    worker's stderr (socketserver prints one for any exception a handler raises)."""
    import socket
    import struct
    import threading
    import time

    health = Health(WorkerMetrics())
    server = HealthServer(health, "127.0.0.1", 0)
    answering, hung_up = threading.Event(), threading.Event()

    def slow_answer(path: str):
        answering.set()
        hung_up.wait(5)
        return 200, b"x" * (4 << 20), "text/plain"  # more than the socket buffers hold

    server.respond = slow_answer
    server.start()
    try:
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answering.wait(5)
        # close with a reset (linger 0), as a client killed on its timeout may
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        time.sleep(0.2)
        hung_up.set()
        time.sleep(1.0)  # the handler's write fails within milliseconds of this
    finally:
        server.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
