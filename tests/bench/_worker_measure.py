"""Measuring the loops of the worker benchmark: committed-offset slopes, CPU time, latency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from tests.bench.common import REPO

SAMPLE_S = 0.05
CLIENTS = [sys.executable, "-m", "tests.bench._worker_clients"]
_TICK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench.worker {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Probe:
    """Committed offsets of a group and CPU time of a process, sampled together."""

    def __init__(self, admin: KafkaAdminClient, group: str, topic: str):
        self.admin, self.group, self.tp = admin, group, TopicPartition(topic, 0)

    def committed(self) -> int:
        got = self.admin.list_group_offsets({self.group: [self.tp]})[self.group].get(self.tp)
        return max(0, got.offset) if got else 0


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, all threads


def run_loop(
    label: str,
    cmd: list[str],
    env: dict,
    probe: Probe,
    n: int,
    logdir: Path,
    broker_pid: int,
    timeout_s: float = 240,
) -> dict:
    """Start a loop process, sample its group's commits until it exits; the sustained rate."""
    log_path = logdir / f"{label}.log"
    t_spawn = time.monotonic()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    samples: list[tuple[float, int, float, float]] = []  # (t, committed, loop cpu, broker cpu)
    try:
        while True:
            exited = proc.poll() is not None
            cpu, bcpu = cpu_seconds(proc.pid), cpu_seconds(broker_pid)
            t_before = time.monotonic()
            c = probe.committed()
            samples.append(((t_before + time.monotonic()) / 2, c, cpu, bcpu))
            if exited:
                break
            if time.monotonic() - t_spawn > timeout_s:
                raise RuntimeError(
                    f"{label}: committed {c} of {n} after {timeout_s}s; log {log_path}"
                )
            time.sleep(SAMPLE_S)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{label} exited {proc.returncode}; log {log_path}:\n{log_path.read_text()[-2000:]}"
        )
    summary = _last_json(log_path)
    if summary and summary.get("records", n) != n:
        raise RuntimeError(f"{label} handled {summary['records']} records, not {n}; log {log_path}")
    first = next((s for s in samples if s[1] > 0), None)
    last = next((s for s in samples if s[1] >= n), None)
    if first is None or last is None or last[1] - first[1] <= 0 or last[0] <= first[0]:
        raise RuntimeError(
            f"{label}: too few commit samples to time ({len(samples)}); raise the record count"
        )
    dt = last[0] - first[0]
    done = last[1] - first[1]
    cpu = (last[2] - first[2]) if last[2] == last[2] else float("nan")
    return {
        "records": n,
        "timed_records": done,
        "seconds": round(dt, 3),
        "records_per_s": done / dt,
        "startup_s": round(first[0] - t_spawn, 2),
        "cpu_cores": (cpu / dt) if cpu == cpu else None,
        "cpu_us_per_record": (cpu / done * 1e6) if cpu == cpu else None,
        "broker_cpu_cores": (last[3] - first[3]) / dt,
        "summary": summary,
    }


def _last_json(path: Path) -> dict | None:
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def end_offset(bootstrap: str, topic: str) -> int:
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    tp = TopicPartition(topic, 0)
    try:
        return c.end_offsets([tp])[tp]
    finally:
        c.close()


def percentile_summary(lat_ms: np.ndarray) -> dict:
    if not len(lat_ms):
        return {"count": 0}
    p = np.percentile(lat_ms, [50, 90, 99, 99.9])
    return {
        "count": int(len(lat_ms)),
        "p50_ms": float(p[0]),
        "p90_ms": float(p[1]),
        "p99_ms": float(p[2]),
        "p99.9_ms": float(p[3]),
        "max_ms": float(lat_ms.max()),
        "mean_ms": float(lat_ms.mean()),
    }


def measure_latency(
    ctx: dict, encoding: str, data: Path, rate: float, seconds: float, label: str, extra_env: dict
) -> dict:
    """WORKER_EMIT=all at a steady `rate`; every event's arrival here minus its input's timestamp."""
    from tests.bench._worker_clients import STEADY_PRODUCER, encode

    bootstrap = ctx["bootstrap"]
    topic, out = f"lat-{encoding}-{label}", f"lat-{encoding}-{label}-events"
    ctx["create"]([topic, out, f"{topic}.dlq"])
    env = {
        **ctx["env"](topic, out, f"lat-{encoding}-{label}", max_records=None, emit="all"),
        **extra_env,
    }
    log_path = ctx["logdir"] / f"latency-{encoding}-{label}.log"
    # A short fetch wait: Tansu answers a fetch at its max wait rather than when data
    # arrives, which would add ~100 ms of this consumer's own to every figure.
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=10,
    )
    tp = TopicPartition(out, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    warmup = 200
    with open(log_path, "wb") as f:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker"], env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT
        )
    lat: list[tuple[float, int, int]] = []  # (arrival here, input timestamp, detected_at_ms)
    received = 0
    try:
        # Warm-up: the worker has joined its group and scored once before the clock starts.
        producer = KafkaProducer(bootstrap_servers=bootstrap, **STEADY_PRODUCER)
        for key, value, headers in encode(np.load(data)[:warmup], encoding):
            producer.send(topic, key=key, value=value, headers=headers)
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 90
        while received < warmup:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"latency {encoding}: worker not serving; log {log_path}")
            received += sum(len(r) for r in consumer.poll(timeout_ms=200).values())
        sender = subprocess.Popen(
            [*CLIENTS, "steady", bootstrap, str(data), topic, encoding, str(rate), str(seconds)],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        expected = warmup + int(rate * seconds)
        deadline = time.monotonic() + seconds + 60
        while received < expected and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=200)
            now_ms = time.time() * 1000
            for records in polled.values():
                for rec in records:
                    received += 1
                    if rec.offset >= warmup:
                        event = orjson.loads(rec.value)
                        lat.append(
                            (now_ms, event["source"]["timestamp_ms"], event["detected_at_ms"])
                        )
            if sender.poll() is not None and sender.returncode != 0:
                raise RuntimeError(f"latency {encoding}: producer exited {sender.returncode}")
        sent = json.loads(sender.communicate(timeout=60)[0].decode().strip().splitlines()[-1])
    finally:
        consumer.close()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    arrival, sent_ms, detected = np.asarray(lat, dtype=np.float64).reshape(-1, 3).T
    summary = percentile_summary(arrival - sent_ms)
    split = {
        "input_to_detected": percentile_summary(detected - sent_ms),
        "detected_to_arrival": percentile_summary(arrival - detected),
    }
    return {
        "encoding": encoding,
        "loop": label,
        "target_rate": rate,
        "achieved_rate": sent["achieved_rate"],
        "seconds": seconds,
        "events_expected": int(rate * seconds),
        "events_received": len(lat),
        **summary,
        "split": split,
    }
