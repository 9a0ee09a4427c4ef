"""The demo's drift act: the machines move to a new operating point, and the product
closes the loop by itself (docs/contract.md#drift, #shadow-rollout).

The worker's drift monitor opens a drift incident on the incident topic; the trainer,
run as the product runs it (`python -m training --from-kafka --every-seconds …
--incident-topic …`), retrains on every record since the incident opened and
publishes; the worker scores the new version in shadow beside the serving one and
promotes it; under the new model the windows are quiet again and the incident
resolves. This module starts the trainer and follows the worker's and the trainer's
logs (what an operator would watch), printing the steps of the loop as they happen.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import orjson

# The new operating point: the load 0.8 σ higher and the coolant set-point raised by
# 1.5 σ. A load shift alone moves the sensors along their correlations: the knn score
# sees it (drift opens), but the autoencoder still reconstructs those rows as well as
# a model retrained on 25 epochs, so the trainer's not-worse check keeps the live model.
LOAD_SHIFT = 0.8
SETPOINTS = {"coolant_temp": 1.5}


def shift_text() -> str:
    return f"load +{LOAD_SHIFT:g} σ, " + ", ".join(
        f"{name} set-point {d:+g} σ" for name, d in SETPOINTS.items()
    )


# Shadow in the demo: 2 000 rows (5 s of the default stream; compose and Kubernetes
# run 10 000). The demo's traffic is ~5 % labelled anomalies, far more than a plant's,
# and they come in episodes: a model at its 1 % target flags 3–5 % of it on average
# and up to 10.5 % of some 2 000 rows (measured on four streams), which the band
# [t/F, t·F] must hold: F = 12. It still refuses a candidate that flags nearly
# everything (one trained on anomalies) or nearly nothing.
SHADOW_RECORDS = 2000
SHADOW_MAX_RATE_FACTOR = 12.0
# The drift test's level (docs/contract.md#drift) assumes rows independent given the
# model. The demo's rows are not: a slowly moving load (AR(1), 0.8 a reading) and 5 %
# anomalous rows, some scored just above the threshold. A model that fits them reads
# T ≈ −3 (median), down to −6.7 in 15 000 records (measured on three streams; at the
# default level 6 a run opened a false drift incident); the shift below reads T ≈ −50.
# So level 12.
DRIFT_LEVEL = 12.0


def start_trainer(
    bootstrap: str,
    input_topic: str,
    incident_topic: str,
    model_dir: Path,
    log_path: Path,
    delay_s: float,
    seed: int,
) -> subprocess.Popen:
    """The trainer in periodic mode with retrain on drift. Its first cycle runs at
    once, on the still empty input topic, and is skipped (`wait_until_idle`); the next
    timer cycle is an hour away, so in the demo it retrains only on drift."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINER_", "KAFKA_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=bootstrap, TRAINER_INPUT_TOPIC=input_topic)
    # the settings of the loop's soak test (tests/integration/test_drift_and_shadow.py)
    flags = ["--out", str(model_dir), "--max-seconds", "30", "--max-records", "8000"]
    flags += ["--epochs", "25", "--every-seconds", "3600", "--keep", "10", "--seed", str(seed)]
    flags += ["--incident-topic", incident_topic, "--drift-delay-seconds", f"{delay_s:g}"]
    with open(log_path, "wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "training", "--from-kafka", *flags],
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def wait_until_idle(log_path: Path, trainer: subprocess.Popen, timeout_s: float = 120) -> bool:
    """Until the trainer's first cycle was skipped (nothing to train on yet): from then
    on it waits for drift incidents. False if it exited or the time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and trainer.poll() is None:
        if any(e.get("event") == "retraining cycle skipped" for e in _json_lines(log_path)):
            return True
        time.sleep(0.2)
    return False


def _epoch_ms(timestamp: str | None) -> float:
    """structlog's ISO time (UTC) in epoch ms; now when a line has none."""
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000
    except (AttributeError, ValueError):
        return time.time() * 1000


def _json_lines(path: Path) -> list[dict]:
    out = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass  # a line being written
    return out


@dataclass
class LoopLog:
    """The loop's steps as the logs told them: (source, the line's time in epoch ms, the line)."""

    lines: list[tuple[str, float, dict]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def find(self, source: str, event: str, **match) -> list[tuple[float, dict]]:
        with self.lock:
            return [
                (ms, e)
                for s, ms, e in self.lines
                if s == source
                and e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())
            ]


class LogFollower(threading.Thread):
    """Follows the worker's and the trainer's JSON logs, keeps the lines of the loop
    and prints them as they come."""

    EVENTS = {
        "worker": {"shadow_started", "shadow_promoted", "model_refused"},
        "trainer": {
            "drift_opened",
            "snapshot",
            "candidate vs live",
            "published",
            "retraining cycle skipped",
        },
    }

    def __init__(
        self,
        paths: dict[str, Path],
        log: LoopLog,
        stop: threading.Event,
        say: Callable[[str], None],
        delay_s: float,
    ):
        super().__init__(daemon=True)
        self.paths, self.log, self.stop, self.say, self.delay_s = paths, log, stop, say, delay_s
        self._offsets = dict.fromkeys(paths, 0)
        self._partial = dict.fromkeys(paths, b"")

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(0.2)
        self.poll()

    def poll(self) -> None:
        fresh = []
        for source, path in self.paths.items():
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets[source])
                    chunk = f.read()
            except OSError:
                continue
            self._offsets[source] += len(chunk)
            *complete, self._partial[source] = (self._partial[source] + chunk).split(b"\n")
            for raw in complete:
                if not raw.startswith(b"{"):
                    continue
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if line.get("event") in self.EVENTS[source]:
                    fresh.append((source, _epoch_ms(line.get("timestamp")), line))
        fresh.sort(key=lambda item: item[1])  # the two logs' lines in the order they happened
        with self.log.lock:
            self.log.lines.extend(fresh)
        for source, _, line in fresh:
            text = self.describe(source, line)
            if text:
                self.say(text)

    def describe(self, source: str, e: dict) -> str | None:
        ev = e["event"]
        if source == "worker":
            if ev == "shadow_started":
                return (
                    f"◐ worker: {e['version']} in shadow beside {e['serving']}: it scores the next "
                    f"{e['records']} rows unpublished before it may serve"
                )
            if ev == "shadow_promoted":
                return f"✔ shadow verdict: PROMOTE {e['version']}  ({e['detail']})"
            if e.get("by") is not None:  # a shadow refusal (other refusals come from verification)
                return (
                    f"✘ shadow verdict: REFUSE {e['version']}: {e['reason']}  ({e.get('detail')})"
                )
            return f"✘ worker refused {e.get('version')}: {e.get('reason')}"
        if ev == "drift_opened":
            return (
                f"▶ trainer: saw the drift incident; retrains in {self.delay_s:g} s "
                "on every record since it opened"
            )
        if ev == "snapshot" and e.get("since_ms") is not None:
            return (
                f"▶ trainer: retraining on drift: {e['rows']} rows since the incident opened "
                f"(live model {e.get('live_model')}, its anomalies kept)"
            )
        if ev == "candidate vs live":
            verdict = "publish" if e["publish"] else "keep the live model"
            return (
                f"▶ trainer: candidate's error on its held-out rows {e['candidate_error']:.3f}, "
                f"live model's {e['live_error']:.3f}: {verdict}"
            )
        if ev == "published":
            return f"▶ trainer: published {e['version']}; the worker picks it up from the model directory"
        if ev == "retraining cycle skipped" and e.get("reason") == "drift":
            return f"▶ trainer: drift retrain skipped ({e.get('error')}); tries again in {self.delay_s:g} s"
        return None
