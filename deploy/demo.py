"""make demo (python -m deploy.demo): the whole product on an embedded broker, in under three minutes.

Starts a Kafka-protocol broker (Tansu) on loopback, trains a model on normal sensor
traffic, starts the worker and the trainer (periodic, retraining on drift) as their
own processes, streams labelled mixed traffic of several machines (one Kafka key
each; one reading per machine per second of event time) at a steady rate, publishes
a retrained checkpoint half-way (hot reload, after shadow), then moves the machines to
a new operating point: drift opens, the trainer retrains, shadow promotes, drift
resolves (deploy/demo_drift.py). Prints alerts, incidents and the loop's steps as
they happen, and ends with a summary (record- and episode-level, per phase of the
stream) and a PNG timeline. Ctrl-C at any moment stops everything it started.
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

from deploy import demo_drift, demo_report
from deploy.demo_report import SAMPLE_MS, T_START_MS
from deploy.embedded_broker import EmbeddedBroker, free_port, stop_process
from deploy.sensor_stream import KINDS, SENSORS, Episode, SensorStream
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
    drift: list[tuple[float, dict]] = field(default_factory=list)  # (ms received, message)
    first_seen_ms: dict[str, float] = field(default_factory=dict)  # version → first event
    per_version: dict[str, int] = field(default_factory=dict)  # version → events
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
                    version = ev["model"]["version"]
                    with seen.lock:
                        if i not in seen.score:
                            seen.per_version[version] = seen.per_version.get(version, 0) + 1
                        seen.first_seen_ms.setdefault(version, now)
                        seen.score[i] = ev["score"]
                        seen.version[i] = version
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


def _machine_rows(
    stream_seed: int,
    n: int,
    load_shift: float = 0.0,
    setpoints: dict[str, float] | None = None,
    first: int = 0,
):
    """n records of MACHINES machines, interleaved (record i is machine i % MACHINES's
    reading first + i // MACHINES): rows, labels, kinds, keys, event times, and each
    machine's episodes."""
    per = -(-n // MACHINES)
    parts = [
        SensorStream(seed=stream_seed + 1000 * m, load_shift=load_shift, setpoints=setpoints).mixed(
            per
        )
        for m in range(MACHINES)
    ]
    i = np.arange(n)
    m, j = i % MACHINES, i // MACHINES
    x = np.stack([parts[a][0][b] for a, b in zip(m, j, strict=True)])
    labels = np.asarray([parts[a][1][b] for a, b in zip(m, j, strict=True)])
    kinds = [parts[a][2][b] for a, b in zip(m, j, strict=True)]
    keys = [f"machine-{a}".encode() for a in m]
    ts = T_START_MS + (first + j) * SAMPLE_MS
    episodes = {
        f"machine-{a}": [Episode(e.kind, e.sensor, first + e.start, e.length) for e in parts[a][3]]
        for a in range(MACHINES)
    }
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
                    if msg["kind"] == "drift":
                        with seen.lock:
                            seen.drift.append((time.time() * 1000, msg))
                        _say(_drift_line(msg))
                        continue
                    with seen.lock:
                        history = seen.incidents.setdefault(msg["incident_id"], [])
                        fresh = all(m["sequence"] != msg["sequence"] for m in history)
                        history.append(msg)
                    first, done = msg["sequence"] == 0, msg["status"] == "resolved"
                    if fresh and (first or done) and printed < to_print:
                        at = time.strftime("%H:%M:%S", time.gmtime(msg["updated_at_ms"] / 1000))
                        top = msg["top_features"][0]["name"] if msg["top_features"] else "-"
                        if msg.get("stuck_features"):
                            top = "stuck " + ",".join(msg["stuck_features"])
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


def _drift_line(msg: dict) -> str:
    """A drift incident (docs/contract.md#drift-incidents) as the demo prints it."""
    t = "-" if msg["statistic"] is None else f"{msg['statistic']:.1f}"
    moved = ", ".join(f"{f['name']} {f['shift']:+.1f}" for f in msg["top_features"])
    if msg["status"] == "open":
        return (
            f"⚠ DRIFT OPEN     on topic {msg['topic']}: the serving model {msg['model_version']} no longer "
            f"fits the stream (T = {t}, |T| ≥ {msg['level']:g} opens; {msg['anomaly_share']:.1%} of the "
            f"last {msg['window']['records']} records anomalous); moved most (scaler units): {moved}"
        )
    return (
        f"⚠ DRIFT RESOLVED on topic {msg['topic']} after "
        f"{(msg['ended_at_ms'] - msg['started_at_ms']) / 1000:.0f} s: model {msg['model_version']} fits "
        f"(T = {t} for a full window, |T| < {msg['level']:g})"
    )


def run(args) -> int:
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "models"
    for old in model_dir.glob("*"):
        if old.is_dir():
            import shutil

            shutil.rmtree(old)
    drift_act = args.drift_records > 0
    stop = threading.Event()
    worker: subprocess.Popen | None = None
    trainer: subprocess.Popen | None = None
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

        logs = {"worker": out / "worker.log"}
        if drift_act:
            logs["trainer"] = out / "trainer.log"
            trainer = demo_drift.start_trainer(
                broker.bootstrap,
                TOPICS["input"],
                TOPICS["incidents"],
                model_dir,
                logs["trainer"],
                args.drift_delay_seconds,
                args.seed,
            )
            _say(
                f"▶ trainer started (pid {trainer.pid}): python -m training --from-kafka, retraining when "
                f"a drift incident opens on topic '{TOPICS['incidents']}'; log {logs['trainer']}"
            )
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
            "WORKER_SHADOW_RECORDS": str(demo_drift.SHADOW_RECORDS),
            "WORKER_SHADOW_MAX_RATE_FACTOR": str(demo_drift.SHADOW_MAX_RATE_FACTOR),
            "WORKER_DRIFT_LEVEL": str(demo_drift.DRIFT_LEVEL),
        }
        with open(logs["worker"], "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _say(
            f"▶ worker started (pid {worker.pid}); metrics on http://127.0.0.1:{metrics_port}/metrics, log {logs['worker']}"
        )
        loop_log = demo_drift.LoopLog()
        follower = demo_drift.LogFollower(logs, loop_log, stop, _say, args.drift_delay_seconds)
        follower.start()

        # The retrained model (fresh normal traffic, another seed) is fitted now, so
        # training does not compete with the stream for the CPU; it is published half-way.
        retrained = fit(
            SensorStream(seed=args.seed + 1).normal(args.train_rows),
            SENSORS,
            _train_config(args.seed + 1),
        )
        _wait_for_partitions(metrics_port, worker)
        if trainer is not None and not demo_drift.wait_until_idle(logs["trainer"], trainer):
            print(f"demo FAILED: the trainer did not start; see {logs['trainer']}", file=sys.stderr)
            return 1
        x, labels, kinds, keys, ts, episodes = _machine_rows(args.seed + 7, args.records)
        if drift_act:  # the same machines at the new operating point, their clocks going on
            more = _machine_rows(
                args.seed + 8,
                args.drift_records,
                demo_drift.LOAD_SHIFT,
                demo_drift.SETPOINTS,
                first=-(-args.records // MACHINES),
            )
            x2, labels2, kinds2, keys2, ts2, episodes2 = more
            x, labels, ts = (
                np.concatenate([x, x2]),
                np.concatenate([labels, labels2]),
                np.concatenate([ts, ts2]),
            )
            kinds, keys = kinds + kinds2, keys + keys2
            episodes = {k: episodes[k] + episodes2[k] for k in episodes}
        seen = Seen(sent_at_ms=np.zeros(len(x)))
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
        act1 = labels[: args.records]
        n_episodes = sum(
            ep.start < -(-args.records // MACHINES) for e in episodes.values() for ep in e
        )
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
        _say(
            f"▶ streaming {args.records} records of {MACHINES} machines (Kafka keys machine-0…{MACHINES - 1}, "
            f"one reading a second of event time) at {args.rate}/s with {int(act1.sum())} labelled anomalous rows "
            f"({n_episodes} episodes: {', '.join(KINDS)})"
            + (
                f"; then the machines move to a new operating point until the drift loop has run "
                f"(at most {args.drift_records} records)\n"
                if drift_act
                else "\n"
            )
        )
        half = args.records // 2
        new_version: list[str] = []
        start = time.monotonic()
        sent = 0
        with tqdm(total=len(x), unit="rec", desc="streaming", file=sys.stderr, disable=None) as bar:
            for i in range(len(x)):
                if i == args.records:
                    _say(
                        f"▶ record {i}: the machines move to a new operating point "
                        f"({demo_drift.shift_text()}) and stay there"
                    )
                seen.sent_at_ms[i] = time.time() * 1000
                producer.send(
                    TOPICS["input"], key=keys[i], value=encode_json(x[i], id=str(i), ts=int(ts[i]))
                )
                sent = i + 1
                if i == half:
                    new_version.append(publish(model_dir, retrained.model, retrained.manifest))
                    _say(
                        f"▶ half-way: published retrained model {new_version[0]}; the worker hot-reloads it"
                    )
                if i % 50 == 49:
                    bar.update(50)
                    if i >= args.records and _loop_done(seen, loop_log, args.after_promotion):
                        break
                    ahead = (i + 1) / args.rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
            bar.update(sent - bar.n)
        producer.flush()
        producer.close()
        stream_s = time.monotonic() - start
        deadline = time.monotonic() + 60
        while len(seen.score) < sent and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # the last batch's incident messages
        stop.set()
        consumer.join(timeout=10)
        watcher.join(timeout=10)
        follower.join(timeout=10)
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
        worker = None
        if trainer is not None:
            trainer_code = stop_process(trainer, timeout_s=30)
            trainer = None
            if trainer_code != 0:
                code = code or trainer_code
        return demo_report.summarise(
            args,
            out,
            seen,
            loop_log,
            labels[:sent],
            kinds[:sent],
            _episodes_sent(episodes, keys[:sent], ts[:sent]),
            stream_s,
            half,
            args.records if drift_act and sent > args.records else None,
            v1,
            new_version,
            code,
            time.monotonic() - t0,
            MACHINES,
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
        for proc in (worker, trainer):
            if proc is not None:
                stop_process(proc, timeout_s=30)
        broker.stop()


def _loop_done(seen: Seen, loop_log: demo_drift.LoopLog, after_promotion: int) -> bool:
    """The drift act may end: its drift incident resolved, and the version the trainer
    retrained on drift has scored `after_promotion` records."""
    with seen.lock:
        resolved = any(m["status"] == "resolved" for _, m in seen.drift)
        counts = dict(seen.per_version)
    published = [e["version"] for _, e in loop_log.find("trainer", "published")]
    return resolved and any(counts.get(v, 0) >= after_promotion for v in published)


def _episodes_sent(episodes: dict, keys: list[bytes], ts: np.ndarray) -> dict:
    """The episodes whose every reading was sent (the drift act ends when its loop has run)."""
    last: dict[str, int] = {}
    for k, t in zip(keys, ts.tolist(), strict=True):
        last[k.decode()] = max(last.get(k.decode(), 0), t)
    return {
        key: [
            ep
            for ep in eps
            if T_START_MS + (ep.start + ep.length - 1) * SAMPLE_MS <= last.get(key, -1)
        ]
        for key, eps in episodes.items()
    }


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=30000)
    p.add_argument("--rate", type=int, default=400, help="records per second")
    p.add_argument("--train-rows", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-alerts", type=int, default=25)
    p.add_argument("--print-incidents", type=int, default=40)
    p.add_argument("--out", default="demo-out")
    p.add_argument(
        "--drift-records",
        type=int,
        default=30000,
        help="the drift act: at most this many records at a new operating point, streamed "
        "until drift opened, the retrained model was promoted and drift resolved (0: no drift act)",
    )
    p.add_argument(
        "--drift-delay-seconds",
        type=float,
        default=15,
        help="the trainer's --drift-delay-seconds: how long after the drift incident opened it retrains",
    )
    p.add_argument(
        "--after-promotion",
        type=int,
        default=4000,
        help="the drift act goes on until the promoted model has scored this many records",
    )
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
