"""What both test tiers share: the data generator, waiting on a condition, stopping a
process, and hostile (pickle) payloads. Kafka helpers live in integration/kafka_helpers."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from deploy.embedded_broker import stop_process
from worker.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, sha256_bytes


def normal_rows(n: int, seed: int, dim: int = 8, factors: int = 3) -> np.ndarray:
    """Correlated normal traffic: `dim` sensors driven by `factors` latent factors
    through one fixed mixing, plus a little noise. The same seed gives the same rows."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(42).normal(size=(factors, dim))
    return (rng.normal(size=(n, factors)) @ mix + 0.1 * rng.normal(size=(n, dim))).astype(
        np.float32
    )


def wait_for(
    pred,
    timeout_s: float,
    interval_s: float = 0.2,
    what: str = "condition",
    proc: subprocess.Popen | None = None,
):
    """Poll `pred` until it returns something truthy, and return that. Fails on timeout,
    or at once when `proc` (a process the condition depends on) has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        value = pred()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def stop_worker(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
    """Stop a worker process with `sig` (stop_process: signal, grace, kill) and return its
    exit code; fails if it did not exit by itself within `timeout_s`."""
    code = stop_process(proc, timeout_s=timeout_s, sig=sig)
    if code == -signal.SIGKILL and sig != signal.SIGKILL:
        raise AssertionError(f"the worker did not stop within {timeout_s:.0f}s of {sig!r}")
    return code


class PickleCanary:
    """Unpickling this touches `path`: proof that something ran pickle."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


def pickle_payload(canary: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    """Bytes that touch `canary` if anything unpickles them."""
    return pickle.dumps(PickleCanary(canary), protocol=protocol)


def plant_pickle(
    version_dir: Path, canary: Path, where: str = "weights", protocol: int = pickle.HIGHEST_PROTOCOL
) -> None:
    """Make a published checkpoint hostile with a pickle that touches `canary`: as its
    weights (the manifest's sha256 updated to match, so only the payload check can
    refuse it), or as a stray file beside them (`where` = "weights" or a file name)."""
    payload = pickle_payload(canary, protocol)
    if where != "weights":
        (version_dir / where).write_bytes(payload)
        return
    (version_dir / WEIGHTS_FILE).write_bytes(payload)
    manifest_path = version_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["weights_sha256"] = sha256_bytes(payload)
    manifest_path.write_text(json.dumps(manifest))
