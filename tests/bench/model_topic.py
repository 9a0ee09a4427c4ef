"""How fast a checkpoint published to the model topic serves on every worker.

    .venv/bin/python -m tests.bench.model_topic      (also part of make bench)

The goal (issue 15): a new checkpoint serving on every worker within
2 × WORKER_RELOAD_POLL_S of its publication, with 3 workers on the embedded broker,
without a record lost. Three `python -m worker` processes (one consumer group, three
input partitions, a model cache each, WORKER_RELOAD_POLL_S=2, WORKER_EMIT=all) score a
steady stream while the trainer's own publisher (worker.model_topic.publish_version)
sends PUBLICATIONS new versions, a few seconds apart at varying phases of the poll.
For each, the time from the commit record's acknowledgement (the publication) until
all three workers' /metrics report it in cae_model_info, sampled every 50 ms. Then
the stream stops, the workers drain on SIGTERM, and every input id must have its
event. Writes results/model_topic.json.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

from deploy.embedded_broker import EmbeddedBroker, free_port, stop_process
from tests.bench.common import machine, now_iso, write_results
from tests.integration.conftest import train_tiny
from tests.integration.kafka_helpers import (
    create_topics,
    events_of,
    metric_total,
    producer,
    read_topic,
    start_worker,
    unique,
    wait_for,
    worker_env,
)
from tests.support import normal_rows
from worker import codec
from worker.checkpoint import publish
from worker.model_topic import publish_version
from worker.settings import KafkaSettings

WORKERS = 3
POLL_S = 2.0
PUBLICATIONS = 6
RATE_PER_S = 400
CHUNK_BYTES = 4096  # several chunks per version, as a large model would have


def _serving(ports: list[int], version: str) -> list[bool]:
    out = []
    for port in ports:
        try:
            out.append(metric_total(port, "cae_model_info", version=version) == 1)
        except OSError:
            out.append(False)
    return out


class Stream(threading.Thread):
    """Steady input at RATE_PER_S until stopped; remembers how many it sent."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        p = producer(self.bootstrap)
        rows = normal_rows(2000, seed=3)
        start = time.monotonic()
        while not self.stop.is_set():
            for _ in range(20):
                row = rows[self.sent % len(rows)]
                p.send(
                    self.topic,
                    key=str(self.sent % 13).encode(),
                    value=codec.encode_json(row, id=f"m{self.sent}"),
                )
                self.sent += 1
            ahead = self.sent / RATE_PER_S - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        p.flush()
        p.close()


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(log_path=Path(tmp) / "b.log") as b:
        return measure(b.bootstrap, Path(tmp))


def measure(bootstrap: str, tmp: Path) -> dict:
    topics = {
        "input": unique("features"),
        "output": unique("anomalies"),
        "dlq": unique("dlq"),
        "group": unique("group"),
    }
    create_topics(bootstrap, [topics["input"], topics["output"], topics["dlq"]], partitions=3)
    model_topic = unique("models")
    from kafka import KafkaAdminClient

    from deploy.init_topics import ensure_model_topic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    ensure_model_topic(admin, model_topic, 1)
    admin.close()

    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    trainer_dir = tmp / "trainer"
    models = [train_tiny(0), train_tiny(1)]

    def publish_next(i: int) -> tuple[str, float, float]:
        m = models[i % 2]
        version = publish(trainer_dir, m.model, m.manifest)
        t0 = time.monotonic()
        publish_version(kafka, model_topic, trainer_dir / version, CHUNK_BYTES)
        return version, t0, time.monotonic()

    first, _, _ = publish_next(0)
    env = worker_env(
        bootstrap,
        topics,
        tmp / "unused",
        WORKER_MODEL_TOPIC=model_topic,
        WORKER_RELOAD_POLL_S=str(POLL_S),
        WORKER_EMIT="all",
        WORKER_LOG_LEVEL="INFO",
    )
    ports = [free_port() for _ in range(WORKERS)]
    procs = [
        start_worker(
            {**env, "WORKER_METRICS_PORT": str(port), "WORKER_MODEL_CACHE_DIR": str(tmp / f"c{i}")},
            tmp / f"w{i}.log",
        )
        for i, port in enumerate(ports)
    ]
    stream = None
    try:

        def ready() -> bool:
            try:
                held = [metric_total(port, "cae_assigned_partitions") for port in ports]
            except OSError:
                return False
            return held == [1.0] * WORKERS and all(_serving(ports, first))

        wait_for(ready, 120, 0.2, "3 workers serving, one partition each")
        stream = Stream(bootstrap, topics["input"])
        stream.start()
        rows = []
        for i in range(1, PUBLICATIONS + 1):
            time.sleep(3.0 + 0.37 * i)  # a different phase of the workers' polls each time
            version, t0, published = publish_next(i)
            done: dict[int, float] = {}
            deadline = published + 60
            while len(done) < WORKERS and time.monotonic() < deadline:
                for w, ok in enumerate(_serving(ports, version)):
                    if ok and w not in done:
                        done[w] = time.monotonic() - published
                time.sleep(0.05)
            row = {
                "version": version,
                "publish_s": round(published - t0, 3),
                "per_worker_s": [round(done.get(w, float("nan")), 3) for w in range(WORKERS)],
                "all_serving_s": round(max(done.values()), 3) if len(done) == WORKERS else None,
            }
            print(row, flush=True)
            rows.append(row)
        time.sleep(2.0)
        stream.stop.set()
        stream.join(timeout=60)
        sent = stream.sent
        wait_for(
            lambda: sum(metric_total(p, "cae_records_total") for p in ports) >= sent,
            120,
            0.5,
            f"{sent} records scored",
        )
    finally:
        if stream is not None:
            stream.stop.set()
        codes = [stop_process(p, timeout_s=60) for p in procs]
    events = events_of(read_topic(bootstrap, topics["output"], expect=sent, timeout_s=120))
    ids = [e["id"] for e in events]
    lost = len({f"m{i}" for i in range(sent)} - set(ids))
    spread = [r["all_serving_s"] for r in rows]
    worst = None if None in spread else max(spread)
    goal = 2 * POLL_S
    results = {
        "date": now_iso(),
        "machine": machine(),
        "command": ".venv/bin/python -m tests.bench.model_topic",
        "workers": WORKERS,
        "reload_poll_s": POLL_S,
        "chunk_bytes": CHUNK_BYTES,
        "rate_per_s": RATE_PER_S,
        "publications": rows,
        "records_sent": sent,
        "events": len(ids),
        "duplicates": len(ids) - len(set(ids)),
        "lost": lost,
        "worker_exit_codes": codes,
        "load_avg_1m_at_end": round(__import__("os").getloadavg()[0], 2),
        "ratios": [
            {
                "name": f"checkpoint on the model topic serving on all {WORKERS} workers, "
                f"worst of {PUBLICATIONS} (s, WORKER_RELOAD_POLL_S={POLL_S:g})",
                "value": worst,
                "goal": goal,
                "met": worst is not None and worst <= goal,
            },
            {
                "name": f"checkpoint on the model topic serving on all {WORKERS} workers, median (s)",
                "value": None if worst is None else round(statistics.median(spread), 3),
                "goal": None,
                "met": None,
            },
            {"name": "records lost", "value": lost, "goal": "= 0", "met": lost == 0},
        ],
    }
    write_results("model_topic", results)
    print(
        f"all {WORKERS} serving after publication: worst {worst} s, median "
        f"{results['ratios'][1]['value']} s (goal ≤ {goal:g} s); sent {sent}, events "
        f"{len(ids)}, lost {lost}, duplicates {results['duplicates']}; exits {codes}"
    )
    return results


if __name__ == "__main__":
    main()
