"""make demo (python -m deploy.demo): the whole product on an embedded broker, in about two minutes.

Starts a Kafka-protocol broker (Tansu) on loopback, trains a model on normal sensor
traffic, starts the worker as its own process, streams labelled mixed traffic of
several machines (one Kafka key each; one reading per machine per second of event
time) at a steady rate, retrains and publishes a new checkpoint half-way (hot
reload), prints alerts and incidents as they arrive, and ends with a summary (record-
and episode-level) and a PNG timeline. Ctrl-C at any moment stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from deploy.embedded_broker import EmbeddedBroker, free_port, stop_process
from deploy.sensor_stream import KINDS, SENSORS, SensorStream
from training.config import TrainConfig
from training.fit import fit
from worker.checkpoint import publish
from worker.codec import encode_json

ROOT = Path(__file__).resolve().parents[1]
TOPICS = {
    "input": "features",
    "output": "anomalies",
    "dlq": "features.dlq",
    "incidents": "incidents",
    "state": "incidents.state",
}
INPUT_PARTITIONS = 3
MACHINES = 4
SAMPLE_MS = 1_000  # event time between two readings of one machine
T_START_MS = 1_764_230_400_000  # event time of the first readings (2025-11-27 08:00 UTC)


@dataclass
class Seen:
    """What the alert consumer collected, by input id."""

    score: dict[int, float] = field(default_factory=dict)
    flagged: set[int] = field(default_factory=set)
    latency_ms: list[float] = field(default_factory=list)
    version: dict[int, str] = field(default_factory=dict)
    threshold: dict[str, float] = field(default_factory=dict)
    sent_at_ms: np.ndarray | None = None  # wall time each input record was sent
    incidents: dict[str, list[dict]] = field(default_factory=dict)  # id → its messages
    lock: threading.Lock = field(default_factory=threading.Lock)


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)


def _train_config(seed: int) -> TrainConfig:
    # The product's defaults, with a training budget that fits a two-minute demo.
    return TrainConfig(seed=seed, max_epochs=60, batch_size=256, lr=1e-2)


def _consume(
    bootstrap: str,
    seen: Seen,
    labels: np.ndarray,
    kinds: list[str],
    stop: threading.Event,
    alerts_to_print: int,
):
    # Assigned, not a group member: reading starts at once instead of after a group
    # join, which would add seconds to the first events' measured latency.
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )
    consumer.assign(
        [
            TopicPartition(TOPICS["output"], p)
            for p in consumer.partitions_for_topic(TOPICS["output"])
        ]
    )
    printed = 0
    header = f"{'time':8} {'record':>7} {'score':>7} {'p-value':>8}  {'top feature (value vs expected)':40} {'model':8} truth"
    try:
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=200).values():
                now = time.time() * 1000
                for rec in records:
                    ev = orjson.loads(rec.value)
                    i = int(ev["id"])
                    with seen.lock:
                        seen.score[i] = ev["score"]
                        seen.version[i] = ev["model"]["version"]
                        seen.threshold[ev["model"]["version"]] = ev["threshold"]
                        seen.latency_ms.append(now - seen.sent_at_ms[i])
                        if ev["is_anomaly"]:
                            seen.flagged.add(i)
                    if ev["is_anomaly"] and printed < alerts_to_print:
                        if printed == 0:
                            _say(header)
                        top = ev["top_features"][0]
                        feature = f"{top['name']} {top['value']:.1f} vs {top['expected']:.1f}"
                        truth = f"✓ {kinds[i]}" if labels[i] else "✗ false alarm"
                        _say(
                            f"{time.strftime('%H:%M:%S')} {i:>7} {ev['score']:>7.2f} {ev['p_value']:>8.4f}  "
                            f"{feature:40} "
                            f"{ev['model']['version'][-6:]:8} {truth}"
                        )
                        printed += 1
                        if printed == alerts_to_print:
                            _say(
                                f"… (further alerts are counted, not printed; all are in topic '{TOPICS['output']}')"
                            )
    finally:
        consumer.close()


def _machine_rows(stream_seed: int, n: int):
    """n records of MACHINES machines, interleaved (record i is machine i % MACHINES's
    reading i // MACHINES): rows, labels, kinds, keys, event times, and each machine's
    episodes."""
    per = -(-n // MACHINES)
    parts = [SensorStream(seed=stream_seed + 1000 * m).mixed(per) for m in range(MACHINES)]
    i = np.arange(n)
    m, j = i % MACHINES, i // MACHINES
    x = np.stack([parts[a][0][b] for a, b in zip(m, j, strict=True)])
    labels = np.asarray([parts[a][1][b] for a, b in zip(m, j, strict=True)])
    kinds = [parts[a][2][b] for a, b in zip(m, j, strict=True)]
    keys = [f"machine-{a}".encode() for a in m]
    ts = T_START_MS + j * SAMPLE_MS
    episodes = {f"machine-{a}": parts[a][3] for a in range(MACHINES)}
    return x, labels, kinds, keys, ts, episodes


def _consume_incidents(bootstrap: str, seen: Seen, stop: threading.Event, to_print: int):
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )
    topic = TOPICS["incidents"]
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
    printed = 0
    try:
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=200).values():
                for rec in records:
                    msg = orjson.loads(rec.value)
                    with seen.lock:
                        history = seen.incidents.setdefault(msg["incident_id"], [])
                        fresh = all(m["sequence"] != msg["sequence"] for m in history)
                        history.append(msg)
                    first, done = msg["sequence"] == 0, msg["status"] == "resolved"
                    if fresh and (first or done) and printed < to_print:
                        at = time.strftime("%H:%M:%S", time.gmtime(msg["updated_at_ms"] / 1000))
                        top = msg["top_features"][0]["name"] if msg["top_features"] else "-"
                        what = "RESOLVED" if done else "OPEN    "
                        span = (
                            f"after {(msg['ended_at_ms'] - msg['started_at_ms']) / 1000:.0f} s"
                            if done
                            else f"severity {msg['severity']}"
                        )
                        _say(
                            f"⚑ incident {what} {msg['key']:10} {msg['incident_id'][:8]}  event time {at}  "
                            f"{msg['anomalies']:>3} of {msg['records']:>3} records anomalous, top {top:14} {span}"
                        )
                        printed += 1
                        if printed == to_print:
                            _say(
                                f"… (further incidents are counted, not printed; all are in topic '{topic}')"
                            )
    finally:
        consumer.close()


def episode_report(incidents: dict[str, list[dict]], episodes: dict) -> dict:
    """Episode-level detection: an incident matches an episode of its key when its
    [started_at, ended_at] event-time span overlaps the episode's rows (an open
    incident: up to its latest update). Spikes (one record) cannot open an incident
    and are left out."""
    last = {iid: max(msgs, key=lambda m: m["sequence"]) for iid, msgs in incidents.items()}
    opened = {
        iid: min(msgs, key=lambda m: m["sequence"])["updated_at_ms"]
        for iid, msgs in incidents.items()
    }
    spans = [
        (m["key"], m["started_at_ms"], m["ended_at_ms"] or m["updated_at_ms"], iid)
        for iid, m in last.items()
    ]
    matched: set[str] = set()
    detected, exactly_one, to_open, total = 0, 0, [], 0
    for key, eps in episodes.items():
        for ep in eps:
            if ep.length < 2:
                continue
            total += 1
            lo = T_START_MS + ep.start * SAMPLE_MS
            hi = T_START_MS + (ep.start + ep.length - 1) * SAMPLE_MS
            hits = [iid for k, a, b, iid in spans if k == key and a <= hi and b >= lo]
            matched.update(hits)
            if hits:
                detected += 1
                exactly_one += len(hits) == 1
                to_open.append((min(opened[i] for i in hits) - lo) / 1000)
    return {
        "episodes": total,
        "detected": detected,
        "exactly_one": exactly_one,
        "false_incidents": len(last) - len(matched),
        "incidents": len(last),
        "time_to_open_s": to_open,
    }


def _plot(
    path: Path,
    scores: np.ndarray,
    labels: np.ndarray,
    versions: list[str],
    thresholds: dict,
    reload_at: int,
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 5))
    t = np.arange(len(scores))
    ok = np.isfinite(scores)
    ax.scatter(
        t[ok & (labels == 0)], scores[ok & (labels == 0)], s=2, c="tab:blue", label="normal traffic"
    )
    ax.scatter(
        t[ok & (labels == 1)],
        scores[ok & (labels == 1)],
        s=8,
        c="tab:red",
        label="injected anomaly",
    )
    for v in dict.fromkeys(versions):
        idx = np.flatnonzero(np.asarray(versions) == v)
        if len(idx) and v in thresholds:
            ax.hlines(
                thresholds[v], idx.min(), idx.max(), colors="black", linestyles="--", linewidth=1
            )
    ax.axvline(reload_at, color="tab:green", linewidth=1, label="retrained model published")
    ax.set_yscale("log")
    ax.set_xlabel("record")
    ax.set_ylabel("anomaly score (log)")
    ax.set_title("cae-stream demo: score timeline (dashed: threshold of the serving model)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "models"
    for old in model_dir.glob("*"):
        if old.is_dir():
            import shutil

            shutil.rmtree(old)
    stop = threading.Event()
    worker: subprocess.Popen | None = None
    producer = None
    broker = EmbeddedBroker(log_path=out / "broker.log")
    try:
        t0 = time.monotonic()
        broker.start()
        _say(f"▶ broker (Tansu, embedded) on {broker.bootstrap}")
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        # the incidents' state changelog needs the input's partition count
        per_key = (TOPICS["input"], TOPICS["state"])
        admin.create_topics(
            [NewTopic(t, INPUT_PARTITIONS if t in per_key else 1, 1) for t in TOPICS.values()]
        )
        admin.close()

        stream = SensorStream(seed=args.seed)
        train_rows = stream.normal(args.train_rows)
        first = fit(train_rows, SENSORS, _train_config(args.seed))
        v1 = publish(model_dir, first.model, first.manifest)
        _say(f"▶ trained on {len(train_rows)} normal rows of {len(SENSORS)} sensors → model {v1}")

        metrics_port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "KAFKA_"))},
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "WORKER_INPUT_TOPIC": TOPICS["input"],
            "WORKER_OUTPUT_TOPIC": TOPICS["output"],
            "WORKER_DLQ_TOPIC": TOPICS["dlq"],
            "WORKER_INCIDENT_TOPIC": TOPICS["incidents"],
            "WORKER_INCIDENT_STATE_TOPIC": TOPICS["state"],
            "WORKER_MODEL_DIR": str(model_dir),
            "WORKER_EMIT": "all",  # every decision, so the timeline has every score
            "WORKER_METRICS_PORT": str(metrics_port),
            "WORKER_METRICS_HOST": "127.0.0.1",
            "WORKER_RELOAD_POLL_S": "0.5",
            "WORKER_SESSION_TIMEOUT_MS": "6000",
            "WORKER_HEARTBEAT_INTERVAL_MS": "1000",
        }
        with open(out / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _say(
            f"▶ worker started (pid {worker.pid}); metrics on http://127.0.0.1:{metrics_port}/metrics, log {out / 'worker.log'}"
        )

        # The retrained model (fresh normal traffic, another seed) is fitted now, so
        # training does not compete with the stream for the CPU; it is published half-way.
        retrained = fit(
            SensorStream(seed=args.seed + 1).normal(args.train_rows),
            SENSORS,
            _train_config(args.seed + 1),
        )
        _wait_for_partitions(metrics_port, worker)
        x, labels, kinds, keys, ts, episodes = _machine_rows(args.seed + 7, args.records)
        seen = Seen(sent_at_ms=np.zeros(args.records))
        consumer = threading.Thread(
            target=_consume,
            args=(broker.bootstrap, seen, labels, kinds, stop, args.print_alerts),
            daemon=True,
        )
        consumer.start()
        watcher = threading.Thread(
            target=_consume_incidents,
            args=(broker.bootstrap, seen, stop, args.print_incidents),
            daemon=True,
        )
        watcher.start()
        n_episodes = sum(len(e) for e in episodes.values())
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
        _say(
            f"▶ streaming {args.records} records of {MACHINES} machines (Kafka keys machine-0…{MACHINES - 1}, "
            f"one reading a second of event time) at {args.rate}/s with {int(labels.sum())} labelled anomalous rows "
            f"({n_episodes} episodes: {', '.join(KINDS)})\n"
        )
        half = args.records // 2
        new_version: list[str] = []
        start = time.monotonic()
        with tqdm(
            total=args.records, unit="rec", desc="streaming", file=sys.stderr, disable=None
        ) as bar:
            for i in range(args.records):
                seen.sent_at_ms[i] = time.time() * 1000
                producer.send(
                    TOPICS["input"], key=keys[i], value=encode_json(x[i], id=str(i), ts=int(ts[i]))
                )
                if i == half:
                    new_version.append(publish(model_dir, retrained.model, retrained.manifest))
                    _say(
                        f"▶ half-way: published retrained model {new_version[0]}; the worker hot-reloads it"
                    )
                if i % 50 == 49:
                    bar.update(50)
                    ahead = (i + 1) / args.rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
            bar.update(args.records - bar.n)
        producer.flush()
        producer.close()
        stream_s = time.monotonic() - start
        deadline = time.monotonic() + 60
        while (
            len(seen.score) < args.records and time.monotonic() < deadline and worker.poll() is None
        ):
            time.sleep(0.2)
        time.sleep(1.0)  # the last batch's incident messages
        stop.set()
        consumer.join(timeout=10)
        watcher.join(timeout=10)
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
        worker = None
        return _summarise(
            args,
            out,
            seen,
            labels,
            kinds,
            episodes,
            stream_s,
            half,
            v1,
            new_version,
            code,
            time.monotonic() - t0,
        )
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the worker and the broker", file=sys.stderr)
        return 130
    finally:
        stop.set()
        if producer is not None:
            # Interrupted mid-stream: records may wait in the producer. Left to
            # kafka-python's exit handler, close() would wait for them (up to its
            # 120 s delivery timeout) after the broker is gone; this drops its exit
            # handler, and its sender is a daemon thread.
            try:
                producer.close(timeout=1)
            except KafkaError:  # what could not be flushed in that second is abandoned
                pass
        if worker is not None:
            stop_process(worker, timeout_s=30)
        broker.stop()


def _wait_for_partitions(port: int, worker: subprocess.Popen, timeout_s: float = 60) -> None:
    """Until the worker holds its input partitions (its `cae_assigned_partitions` gauge),
    so that the latency figures measure scoring, not the group join."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("cae_assigned_partitions ") and float(line.split()[1]) > 0:
                        return
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)


def _summarise(
    args, out, seen, labels, kinds, episodes, stream_s, half, v1, new_version, worker_code, total_s
) -> int:
    n = args.records
    scores = np.full(n, np.nan)
    for i, s in seen.score.items():
        scores[i] = s
    flagged = np.zeros(n, dtype=bool)
    flagged[list(seen.flagged)] = True
    tp = int((flagged & (labels == 1)).sum())
    fp = int((flagged & (labels == 0)).sum())
    fn = int((~flagged & (labels == 1)).sum())
    precision = tp / max(1, tp + fp)
    recall = tp / max(1, tp + fn)
    f1 = 2 * precision * recall / max(1e-12, precision + recall)
    lat = np.asarray(seen.latency_ms)
    versions = [seen.version.get(i, "") for i in range(n)]
    seen_versions = list(dict.fromkeys(v for v in versions if v))
    with seen.lock:
        inc = episode_report(dict(seen.incidents), episodes)
    tto = np.asarray(inc["time_to_open_s"])
    open_text = (
        f"median {np.median(tto):.0f} s, max {tto.max():.0f} s"
        if len(tto)
        else "no incident opened"
    )
    png = out / "timeline.png"
    _plot(png, scores, labels, versions, seen.threshold, half)
    by_kind = []
    for kind in KINDS:
        mask = np.asarray([k == kind for k in kinds])
        if mask.any():
            by_kind.append(f"{kind} {flagged[mask].mean():.0%}")
    lines = [
        "",
        "── summary " + "─" * 60,
        f"records scored         {len(seen.score)} of {n} (worker exit code {worker_code})",
        f"alerts                 {int(flagged.sum())}: {tp} true, {fp} false alarms ({fp / max(1, n - labels.sum()):.2%} of normal rows)",
        f"precision / recall / F1  {precision:.3f} / {recall:.3f} / {f1:.3f}   (labelled rows: {int(labels.sum())})",
        f"recall by kind         {', '.join(by_kind)}",
        f"throughput             {n / stream_s:.0f} records/s sustained (producer rate {args.rate}/s)",
        f"end-to-end latency     p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms"
        if len(lat)
        else "latency: no events",
        f"incidents              {inc['incidents']}: {inc['detected']} of {inc['episodes']} multi-record episodes detected "
        f"({inc['exactly_one']} by exactly one incident), {inc['false_incidents']} false "
        f"({inc['false_incidents'] / max(1e-9, (n - labels.sum()) / 10_000):.2f} per 10 000 normal records)",
        f"time to open           {open_text}   (event time from the episode's first record; spikes are single records: alerts, not incidents)",
        f"model versions seen    {' → '.join(seen_versions)}"
        + ("  (hot reload ✓)" if len(seen_versions) > 1 else ""),
        f"timeline               {png}",
        f"total time             {total_s:.0f} s",
    ]
    print("\n".join(lines))
    summary = {
        "records": n,
        "scored": len(seen.score),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "throughput_rps": n / stream_s,
        "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "versions": seen_versions,
        "incidents": {k: v for k, v in inc.items() if k != "time_to_open_s"},
        "time_to_open_s_median": float(np.median(tto)) if len(tto) else None,
    }
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    ok = len(seen.score) == n and worker_code == 0 and len(seen_versions) > 1
    if not ok:
        print(
            "demo FAILED: not every record was scored, the worker did not exit cleanly, or no reload was seen",
            file=sys.stderr,
        )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=30000)
    p.add_argument("--rate", type=int, default=400, help="records per second")
    p.add_argument("--train-rows", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-alerts", type=int, default=25)
    p.add_argument("--print-incidents", type=int, default=40)
    p.add_argument("--out", default="demo-out")
    args = p.parse_args(argv)
    from worker.logs import configure_logging

    configure_logging(level="WARNING")
    import logging

    logging.getLogger("kafka").setLevel(logging.ERROR)  # the client's event-loop timing notes
    import torch

    # Small models train fastest on one thread; the worker gets the other core.
    torch.set_num_threads(1)
    # SIGTERM (a killed `make demo`, a CI timeout) cleans up like Ctrl-C: the broker and
    # the worker run in their own sessions and would otherwise outlive us.
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C too, also where the demo was started with SIGINT ignored (a non-interactive
    # shell's background job, nohup): Python keeps an inherited SIG_IGN.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return run(args)


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
