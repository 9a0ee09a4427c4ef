"""The fault proxy's delay: each direction adds `delay_s`, without capping the rate."""

from __future__ import annotations

import socket
import threading
import time

from deploy.embedded_broker import free_port
from tests.integration.tcp_proxy import TcpProxy


def echo_server() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_a_delayed_link_adds_the_delay_each_way_and_lets_chunks_overlap():
    srv, port = echo_server()
    proxy = TcpProxy(port, free_port())
    proxy.delay_s = 0.1
    with proxy, srv, socket.create_connection(("127.0.0.1", proxy.port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        for i in range(5):  # five chunks, 10 ms apart: not five round trips
            c.sendall(b"x%d" % i)
            time.sleep(0.01)
        got = b""
        while len(got) < 10:
            got += c.recv(100)
        elapsed = time.monotonic() - t0
    assert got == b"x0x1x2x3x4"
    assert 0.2 <= elapsed < 0.45, f"{elapsed:.3f}s for one round trip of 2 × 100 ms"
