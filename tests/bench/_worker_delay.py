"""The worker behind a delayed link: the broker advertises a TCP proxy that forwards
every chunk `delay` ms late in each direction (tests/integration/tcp_proxy.py), so
every round trip of every client (fetch, produce, commit, transaction) pays 2 × delay.

Per delay, over one pre-filled float32 topic (one consumer group per loop):

* worker, at-least-once   `python -m worker`, defaults (pipelined)
* worker, exactly-once    `python -m worker`, WORKER_DELIVERY=exactly-once
* passthrough             the ceiling: poll, decode, send, commit_async, never
                          waiting for an acknowledgement (tests/bench/_worker_clients.py)

`baseline_repo` adds "worker, at-least-once (baseline)" and "worker, exactly-once
(baseline)": `python -m worker` from another checkout (the same loop before a
change), against the same topic.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from deploy.embedded_broker import EmbeddedBroker, free_port
from tests.bench._worker_measure import CLIENTS, Probe, log, run_group
from tests.bench.common import REPO
from tests.integration.tcp_proxy import TcpProxy

TOPIC = "in-delay"
LOOPS = ("worker, at-least-once", "worker, exactly-once", "passthrough")


def run_delayed(
    delays_ms: list[float],
    data: Path,
    model_dir: Path,
    threshold: float,
    tmp: Path,
    baseline_repo: str | None = None,
) -> dict:
    """{delay_ms: {loop: run_group result}} on a broker of its own behind a proxy."""
    proxy_port = free_port()
    with EmbeddedBroker(advertised_port=proxy_port, log_path=tmp / "tansu-delay.log") as broker:
        proxy = TcpProxy(broker.port, proxy_port).forward()
        try:
            return _run(broker, proxy, delays_ms, data, model_dir, threshold, tmp, baseline_repo)
        finally:
            proxy.close()


def _run(broker, proxy, delays_ms, data, model_dir, threshold, tmp, baseline_repo) -> dict:
    bootstrap = broker.bootstrap  # the proxy
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(TOPIC, 1, 1), NewTopic(f"{TOPIC}.dlq", 1, 1)])
    fill = subprocess.run(
        [*CLIENTS, "fill", bootstrap, str(data), TOPIC, "float32"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    n = json.loads(fill.stdout.decode().strip().splitlines()[-1])["records"]
    baselines = [f"{kind} (baseline)" for kind in LOOPS if kind.startswith("worker")]
    loops = [*LOOPS, *(baselines if baseline_repo else [])]
    out: dict = {}
    for delay in delays_ms:
        proxy.delay_s = delay / 1000  # connections opened from now on
        out[str(delay)] = {}
        for kind in loops:
            slug = f"d{delay:g}-" + re.sub(r"[^a-z0-9.]+", "-", kind).strip("-")
            admin.create_topics([NewTopic(f"{slug}-events", 1, 1)])
            env = {
                **os.environ,
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "WORKER_INPUT_TOPIC": TOPIC,
                "WORKER_OUTPUT_TOPIC": f"{slug}-events",
                "WORKER_DLQ_TOPIC": f"{TOPIC}.dlq",
                "WORKER_GROUP_ID": slug,
                # the loops share the input: each its own incident state
                "WORKER_INCIDENT_TOPIC": f"{slug}-incidents",
                "WORKER_INCIDENT_STATE_TOPIC": f"{slug}-incidents-state",
                # Not the group id: with both equal, Tansu 0.6 showed none of the
                # transaction's offsets to the probe until the worker had exited.
                "WORKER_TRANSACTIONAL_ID": f"{slug}-tx",
                "WORKER_MODEL_DIR": str(model_dir),
                "WORKER_DEVICE": "cpu",
                "WORKER_METRICS_PORT": "0",
                "WORKER_SESSION_TIMEOUT_MS": "6000",
                "WORKER_HEARTBEAT_INTERVAL_MS": "1000",
                "WORKER_MAX_RECORDS": str(n),
            }
            if kind == "passthrough":
                cmd = [*CLIENTS, "passthrough", str(threshold)]
            elif kind.endswith("(baseline)"):
                run = f"import runpy, sys; sys.path.insert(0, {str(baseline_repo)!r}); "
                run += "runpy.run_module('worker', run_name='__main__', alter_sys=True)"
                cmd = [sys.executable, "-c", run]
            else:
                cmd = [sys.executable, "-m", "worker"]
            if "exactly-once" in kind:
                env["WORKER_DELIVERY"] = "exactly-once"
            log(f"delay {delay:g} ms each way, {kind}: {n} records")
            r = run_group(slug, [(cmd, env)], Probe(admin, slug, TOPIC), n, tmp, broker._proc.pid)
            log(
                f"delay {delay:g} ms, {kind}: {r['records_per_s']:,.0f} records/s, "
                f"{r['cpu_us_per_record']:.1f} us cpu/record"
            )
            out[str(delay)][kind] = r
    admin.close()
    return out


def delay_ratios(delayed: dict) -> list[tuple[str, float]]:
    """worker / passthrough per delay and mode, and each loop's rate against its own at 0 ms."""
    rows = []
    base = delayed.get("0") or delayed.get("0.0") or {}
    for delay, loops in delayed.items():
        ceiling = loops["passthrough"]["records_per_s"]
        for kind, r in loops.items():
            if kind == "passthrough":
                continue
            rows.append((f"delay {delay} ms: {kind} / passthrough", r["records_per_s"] / ceiling))
        for kind, r in loops.items():
            if base.get(kind) and delay not in ("0", "0.0"):
                rows.append(
                    (
                        f"delay {delay} ms / 0 ms: {kind}",
                        r["records_per_s"] / base[kind]["records_per_s"],
                    )
                )
    return rows
