"""A small thread-based TCP proxy that injects network faults between clients and a broker.

Modes:

* ``forward`` — bytes flow both ways (the normal state);
* ``stall``   — connections stay open, new ones are accepted, but no byte is forwarded
  in either direction until the mode changes (a black-holed link);
* ``reset``   — every open connection is closed and every new one is closed as soon
  as it is accepted (a link that keeps dropping);
* ``down``    — nothing listens on the port (connection refused), open connections closed.

Every mode change is recorded in `history` (monotonic time, mode), so tests can
measure outage and recovery times.

`delay_s` adds latency without capping bandwidth: each chunk read is forwarded
`delay_s` after it arrived, by a writer thread per direction (a sleep in the reader
would let one chunk through per delay). It applies to connections accepted after
it is set.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

MODES = ("forward", "stall", "reset", "down")


class TcpProxy:
    def __init__(self, target_port: int, port: int, host: str = "127.0.0.1"):
        self.host = host
        self.port = port
        self.target = (host, target_port)
        self.mode = "down"
        self.history: list[tuple[float, str]] = []
        self._flowing = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self.accepted = 0
        self.delay_s = 0.0

    # -- control -------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode
        self.history.append((time.monotonic(), mode))
        self.mode = mode
        if mode == "forward":
            self._listen()
            self._flowing.set()
        elif mode == "stall":
            self._flowing.clear()
            self._listen()
        elif mode == "reset":
            self._flowing.clear()
            self._listen()
            self._drop_all()
        else:
            self._flowing.clear()
            self._close_listener()
            self._drop_all()

    def forward(self) -> TcpProxy:
        self.set_mode("forward")
        return self

    def stall(self) -> None:
        self.set_mode("stall")

    def reset(self) -> None:
        self.set_mode("reset")

    def down(self) -> None:
        self.set_mode("down")

    def close(self) -> None:
        self.set_mode("down")

    def __enter__(self) -> TcpProxy:
        return self.forward()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------

    def _listen(self) -> None:
        if self._listener is not None:
            return
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 30
        while True:
            try:
                srv.bind((self.host, self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    srv.close()
                    raise
                time.sleep(0.2)
        srv.listen(128)
        srv.settimeout(0.2)
        self._listener = srv
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(srv,), name="proxy-accept", daemon=True
        )
        self._accept_thread.start()

    def _close_listener(self) -> None:
        srv, self._listener = self._listener, None
        if srv is not None:
            srv.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            _kill(c)

    def _accept_loop(self, srv: socket.socket) -> None:
        while self._listener is srv:
            try:
                client, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode == "reset":
                _kill(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _kill(client)
                continue
            upstream.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, self.delay_s), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay_s: float = 0.0) -> None:
        send = dst.sendall
        if delay_s > 0:
            line: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=_deliver_late, args=(line, dst), daemon=True).start()

            def send(data: bytes) -> None:
                line.put((time.monotonic() + delay_s, data))

        try:
            while True:
                # Hold bytes back while stalled; a stalled link does not read either,
                # so the sender's buffers fill up as on a black-holed route.
                while not self._flowing.wait(0.2):
                    if src not in self._conns:
                        return
                data = src.recv(65536)
                if not data:
                    break
                while not self._flowing.wait(0.2):
                    if src not in self._conns:
                        return
                send(data)
        except OSError:
            pass
        finally:
            if delay_s > 0:
                line.put(None)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            _kill(src)
            _kill(dst)


def _deliver_late(line: queue.SimpleQueue, dst: socket.socket) -> None:
    while (item := line.get()) is not None:
        due, data = item
        time.sleep(max(0.0, due - time.monotonic()))
        try:
            dst.sendall(data)
        except OSError:
            return


def _kill(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
