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

from deploy.embedded_broker import stop_process
from tests.bench.common import REPO

SAMPLE_S = 0.05
CLIENTS = [sys.executable, "-m", "tests.bench._worker_clients"]
_TICK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench.worker {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def worker_env(
    bootstrap: str,
    model_dir: Path,
    topic: str,
    out: str,
    group: str,
    max_records: int | None,
    emit: str = "anomalies",
) -> dict:
    """The environment of one timed `python -m worker` loop (at-least-once unless the
    caller sets WORKER_DELIVERY): this process's, with the loop's topics and group."""
    e = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "WORKER_INPUT_TOPIC": topic,
        "WORKER_OUTPUT_TOPIC": out,
        "WORKER_DLQ_TOPIC": f"{topic}.dlq",
        "WORKER_GROUP_ID": group,
        # incidents on (the default), on topics of the loop's own: a changelog shared
        # between loops would hand one loop's state (and applied offsets) to the next
        "WORKER_INCIDENT_TOPIC": f"{group}-incidents",
        "WORKER_INCIDENT_STATE_TOPIC": f"{group}-incidents-state",
        # Not the group id: with both equal, Tansu 0.6 showed none of the
        # transaction's offsets to the probe until the worker had exited.
        "WORKER_TRANSACTIONAL_ID": f"{group}-tx",
        "WORKER_MODEL_DIR": str(model_dir),
        "WORKER_DEVICE": "cpu",
        "WORKER_METRICS_PORT": "0",
        "WORKER_EMIT": emit,
        "WORKER_SESSION_TIMEOUT_MS": "6000",
        "WORKER_HEARTBEAT_INTERVAL_MS": "1000",
        "WORKER_WAIT_FOR_MODEL_S": "60",
    }
    e.pop("WORKER_MAX_RECORDS", None)
    e.pop("WORKER_DELIVERY", None)
    if max_records is not None:
        e["WORKER_MAX_RECORDS"] = str(max_records)
    return e


class Probe:
    """Committed offsets of a group over a topic's partitions (summed, and per partition)."""

    def __init__(self, admin: KafkaAdminClient, group: str, topic: str, partitions: int = 1):
        self.admin, self.group = admin, group
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]

    def committed_parts(self) -> tuple[int, ...]:
        got = self.admin.list_group_offsets({self.group: self.tps})[self.group]
        return tuple(max(0, got[tp].offset) if got.get(tp) else 0 for tp in self.tps)

    def committed(self) -> int:
        return sum(self.committed_parts())


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, all threads


def memory_kib(pid: int) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) of a process in KiB; None once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    got = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            got[line[:5]] = int(line.split()[1])
    return got.get("VmRSS"), got.get("VmHWM")


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
    return run_group(label, [(cmd, env)], probe, n, logdir, broker_pid, timeout_s)


def run_group(
    label: str,
    procs: list[tuple[list[str], dict]],
    probe: Probe,
    n: int,
    logdir: Path,
    broker_pid: int,
    timeout_s: float = 240,
    stop_when_committed: bool = False,
    ends: tuple[int, ...] | None = None,
) -> dict:
    """Start one or more loop processes (one consumer group) together and sample the
    group's commits, the processes' CPU time and the first process's resident memory.

    Bounded loops exit by themselves (WORKER_MAX_RECORDS); with `stop_when_committed`
    they get SIGTERM once the group has committed `n` records (several workers share
    the partitions, so none can be given its own bound). `ends` (per-partition end
    offsets) adds the rate over the window in which every partition still had records
    left, from the group's last assignment on: the rate with every worker busy.
    """
    t_spawn = time.monotonic()
    t_spawn_wall = time.time()
    running: list[tuple[subprocess.Popen, Path]] = []
    for i, (cmd, env) in enumerate(procs):
        log_path = logdir / (f"{label}.log" if len(procs) == 1 else f"{label}-{i}.log")
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        running.append((proc, log_path))
    last_cpu = [0.0] * len(running)
    # (monotonic t, wall t, committed per partition, loops' cpu, broker cpu, rss KiB, hwm KiB)
    samples: list[tuple] = []
    stopping = False
    try:
        while True:
            exited = all(p.poll() is not None for p, _ in running)
            for i, (p, _) in enumerate(running):
                c = cpu_seconds(p.pid)
                if c == c:
                    last_cpu[i] = c
            rss, hwm = memory_kib(running[0][0].pid)
            bcpu = cpu_seconds(broker_pid)
            t_before, w_before = time.monotonic(), time.time()
            parts = probe.committed_parts()
            samples.append(
                (
                    (t_before + time.monotonic()) / 2,
                    (w_before + time.time()) / 2,
                    parts,
                    sum(last_cpu),
                    bcpu,
                    rss,
                    hwm,
                )
            )
            if exited:
                break
            if stop_when_committed and not stopping and sum(parts) >= n:
                stopping = True
                for p, _ in running:
                    p.send_signal(signal.SIGTERM)
            if time.monotonic() - t_spawn > timeout_s:
                raise RuntimeError(
                    f"{label}: committed {sum(parts)} of {n} after {timeout_s}s; "
                    f"logs {[str(lp) for _, lp in running]}"
                )
            time.sleep(SAMPLE_S)
        for p, _ in running:
            p.wait(timeout=60)
    finally:
        for p, _ in running:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, lp in running:
        if p.returncode != 0:
            raise RuntimeError(
                f"{label} exited {p.returncode}; log {lp}:\n{lp.read_text()[-2000:]}"
            )
    summaries = [_last_json(lp) for _, lp in running]
    handled = sum((s or {}).get("records", 0) for s in summaries)
    if all(summaries) and handled != n and not stop_when_committed:
        raise RuntimeError(f"{label} handled {handled} records, not {n}; logs in {logdir}")
    total = [(s[0], sum(s[2]), s[3], s[4]) for s in samples]
    first, last = _timed_window(total, n)
    if first is None or last is None or last[1] - first[1] <= 0 or last[0] <= first[0]:
        raise RuntimeError(
            f"{label}: too few commit samples to time ({len(samples)}); raise the record count"
        )
    dt = last[0] - first[0]
    done = last[1] - first[1]
    cpu = last[2] - first[2]
    result = {
        "records": n,
        "processes": len(running),
        "timed_records": done,
        "seconds": round(dt, 3),
        "records_per_s": done / dt,
        "startup_s": round(first[0] - t_spawn, 2),
        "cpu_cores": cpu / dt,
        "cpu_us_per_record": cpu / done * 1e6,
        "broker_cpu_cores": (last[3] - first[3]) / dt,
        "summary": summaries[0] if len(summaries) == 1 else summaries,
        "memory": _memory(samples, first[0], last[0]),
    }
    if ends is not None:
        assigned = [_assignments(lp) for _, lp in running]
        result["assignments"] = [[parts for _, parts in a] for a in assigned]
        # From the group's last (re)assignment, or the first commit, whichever is later.
        t_stable_wall = max([t for a in assigned for t, _ in a[-1:]], default=t_spawn_wall)
        result["all_busy"] = _busy_window(samples, ends, t_stable_wall)
        result["rebalance_s"] = round(t_stable_wall - t_spawn_wall - result["startup_s"], 2)
    return result


def _timed_window(total: list[tuple], n: int) -> tuple:
    """The samples (t, committed, ...) that bound the timed window: the first sample at
    the second commit and the first at the last commit before the end's.

    A loop commits what it finished some time after finishing it: a batch (at-least-
    once) or a commit interval (exactly-once) later, and the timed records are those
    committed in the window. In steady state that lag is the same at both ends, so the
    window holds as many records as were finished in it. Not at the ends: the first
    commit also waits for the connection to the group coordinator (under exactly-once
    the loop scores up to a transaction's worth of records meanwhile), and at the end a
    bounded loop drains and commits at once. A window from the first to the final
    commit counted those records without their time, and overstated the rate: behind a
    5 ms link exactly-once by ~10 %. With fewer commits the window falls back to the
    first and the final one."""
    first = next((s for s in total if s[1] > 0), None)
    if first is None:
        return None, None
    counts = sorted({s[1] for s in total if 0 < s[1] < n})
    if len(counts) >= 3:
        return (
            next(s for s in total if s[1] == counts[1]),
            next(s for s in total if s[1] == counts[-1]),
        )
    return first, next((s for s in total if s[1] >= n), None)


def median_run(runs: list[dict]) -> dict:
    """Rounds of one loop as one result: the round of the median rate (its other
    figures too), with every round's rate, in the order they ran, under "rounds"."""
    r = dict(sorted(runs, key=lambda x: x["records_per_s"])[(len(runs) - 1) // 2])
    r["rounds"] = [x["records_per_s"] for x in runs]
    return r


def rounds_order(kinds: list[str], rounds: int):
    """(round, kind) for `rounds` rounds of the loops `kinds`, taking turns, the order
    reversed every other round, so no loop always runs first or last."""
    for i in range(rounds):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            yield i, kind


def _memory(samples: list[tuple], t_from: float, t_to: float) -> dict:
    """Resident memory (MB = 10^6 bytes) of the first process while it worked, after a
    1 s warm-up from its first commit (model loaded, clients connected, first batches)."""
    kib = [s[5] for s in samples if t_from + 1.0 <= s[0] <= t_to and s[5] is not None]
    if not kib:  # a short run: everything from the first commit on
        kib = [s[5] for s in samples if t_from <= s[0] <= t_to and s[5] is not None]
    hwm = [s[6] for s in samples if s[6] is not None]
    mb = lambda k: round(k * 1024 / 1e6, 1)  # noqa: E731
    if not kib:
        return {"samples": 0}
    return {
        "samples": len(kib),
        "steady_rss_mb": mb(float(np.median(kib))),
        "peak_rss_mb": mb(max(kib)),
        "lifetime_peak_rss_mb": mb(max(hwm)) if hwm else None,  # VmHWM: start-up included
    }


def _assignments(log_path: Path) -> list[tuple[float, list[str]]]:
    """(wall time, partitions) of each `partitions_assigned` line of a worker's log."""
    from datetime import datetime

    out = []
    for line in log_path.read_text().splitlines():
        if '"partitions_assigned"' not in line:
            continue
        try:
            rec = json.loads(line)
            ts = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        out.append((ts, rec.get("partitions", [])))
    return out


def _busy_window(samples: list[tuple], ends: tuple[int, ...], t_stable_wall: float) -> dict:
    """The group's rate while every partition still had records left, from `t_stable_wall`."""
    start = next((s for s in samples if s[1] >= t_stable_wall and sum(s[2]) > 0), None)
    stop = next((s for s in samples if any(c >= e for c, e in zip(s[2], ends, strict=True))), None)
    if start is None or stop is None or stop[0] - start[0] < 4 * SAMPLE_S:
        return {"records_per_s": None, "seconds": 0.0}
    dt = stop[0] - start[0]
    done = sum(stop[2]) - sum(start[2])
    cpu = stop[3] - start[3]
    return {
        "records_per_s": done / dt,
        "seconds": round(dt, 3),
        "timed_records": done,
        "cpu_cores": cpu / dt,
        "cpu_us_per_record": cpu / done * 1e6 if done else None,
    }


def _last_json(path: Path) -> dict | None:
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def end_offsets(bootstrap: str, topic: str, partitions: int = 1) -> tuple[int, ...]:
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        got = c.end_offsets(tps)
        return tuple(got[tp] for tp in tps)
    finally:
        c.close()


def end_offset(bootstrap: str, topic: str) -> int:
    return end_offsets(bootstrap, topic)[0]


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
    ctx: dict,
    encoding: str,
    data: Path,
    rate: float,
    seconds: float,
    label: str,
    extra_env: dict,
    cmd: list[str] | None = None,
    isolation_level: str = "read_uncommitted",
    cwd: str | Path | None = None,
) -> dict:
    """WORKER_EMIT=all at a steady `rate`; every event's arrival here minus its input's timestamp.

    `cmd` replaces `python -m worker` by another loop that emits an event per record (the
    passthrough with threshold 0: the latency floor of the transport); it runs bounded
    (WORKER_MAX_RECORDS = every record this run sends). `isolation_level`
    "read_committed" reads as a downstream consumer of an exactly-once worker does;
    `cwd`: where the worker runs (another checkout's `python -m worker`). Also reported:
    the CPU (cores) of the worker, the producer, the broker (ctx["broker_pid"]) and
    this reader over the timed part, and the records per batch (the events of one
    batch share its detected_at_ms)."""
    from tests.bench._worker_clients import STEADY_PRODUCER, encode

    bootstrap = ctx["bootstrap"]
    topic, out = f"lat-{encoding}-{label}", f"lat-{encoding}-{label}-events"
    ctx["create"]([topic, out, f"{topic}.dlq"])
    warmup = 200
    bound = warmup + int(rate * seconds) if cmd is not None else None
    env = {
        **ctx["env"](topic, out, f"lat-{encoding}-{label}", max_records=bound, emit="all"),
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
        isolation_level=isolation_level,
    )
    tp = TopicPartition(out, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    with open(log_path, "wb") as f:
        worker = subprocess.Popen(
            cmd or [sys.executable, "-m", "worker"],
            env=env,
            cwd=cwd or REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
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
        cpu_from = _cpu_now(worker.pid, sender.pid, ctx.get("broker_pid"))
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
        cpu_to = _cpu_now(worker.pid, sender.pid, ctx.get("broker_pid"))
        sent = json.loads(sender.communicate(timeout=60)[0].decode().strip().splitlines()[-1])
    finally:
        consumer.close()
        stop_process(worker, timeout_s=30)
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
        "isolation_level": isolation_level,
        **summary,
        "split": split,
        "records_per_batch": len(detected) / max(1, len(np.unique(detected))),
        "cpu_cores": {
            k: round((cpu_to[k] - cpu_from[k]) / (cpu_to["t"] - cpu_from["t"]), 3)
            for k in cpu_from
            if k != "t"
        },
    }


def _cpu_now(worker_pid: int, sender_pid: int, broker_pid: int | None) -> dict:
    """CPU seconds so far of the latency run's processes (the producer's and the
    worker's own; this process's as the reader) and the monotonic time."""
    got = {
        "worker": cpu_seconds(worker_pid),
        "producer": cpu_seconds(sender_pid),
        "reader": time.process_time(),
        "t": time.monotonic(),
    }
    if broker_pid is not None:
        got["broker"] = cpu_seconds(broker_pid)
    return got
