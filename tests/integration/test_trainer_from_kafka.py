"""python -m training --from-kafka against the embedded broker."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from tests.integration.conftest import FEATURES
from tests.integration.kafka_helpers import ROOT, producer, start_trainer
from tests.support import normal_rows, stop_worker, wait_for
from training.from_kafka import read_snapshot
from worker import codec
from worker.checkpoint import list_versions, publish, read_latest
from worker.scoring import load_scorer
from worker.settings import KafkaSettings


def run_trainer(bootstrap, topic, out, *flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINER_", "KAFKA_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=bootstrap, TRAINER_INPUT_TOPIC=topic)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "--from-kafka",
            "--out",
            str(out),
            "--max-seconds",
            "30",
            *flags,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def produce(bootstrap, topic, rows, as_dict=False):
    p = producer(bootstrap)
    for row in rows:
        if as_dict:
            p.send(
                topic,
                value=codec.orjson.dumps(
                    {"features": dict(zip(FEATURES, map(float, row), strict=True))}
                ),
            )
        else:
            p.send(topic, value=codec.encode_json(row))
    p.send(topic, value=b"not a record")  # rejected by the codec, not trained on
    p.flush()
    p.close()


def test_the_snapshot_is_the_newest_records_however_the_partitions_filled(broker, topics):
    # older records spread over the three partitions, then newer ones all in partition 0:
    # an equal share per partition would mix old records in and leave new ones out
    p = producer(broker.bootstrap)
    t0 = 1_764_000_000_000
    for i in range(90):
        p.send(topics["input"], value=b"old%d" % i, partition=i % 3, timestamp_ms=t0 + i)
    for i in range(60):
        p.send(topics["input"], value=b"new%d" % i, partition=0, timestamp_ms=t0 + 1000 + i)
    p.flush()
    p.close()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
    snapshot = read_snapshot(kafka, topics["input"], max_records=60, max_seconds=30)
    assert [r.value for r in snapshot] == [b"new%d" % i for i in range(60)]
    everything = read_snapshot(kafka, topics["input"], max_records=1000, max_seconds=30)
    assert len(everything) == 150 and everything[-1].value == b"new59"


def test_first_model_from_the_stream_then_anomalies_left_out(broker, topics, tmp_path):
    out = tmp_path / "models"
    produce(broker.bootstrap, topics["input"], normal_rows(1500, 20), as_dict=True)
    r = run_trainer(
        broker.bootstrap, topics["input"], out, "--epochs", "30", "--max-records", "1600"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    v1 = r.stdout.strip().splitlines()[-1]
    assert read_latest(out) == v1
    first = load_scorer(out / v1)
    assert sorted(first.feature_names) == sorted(FEATURES)  # names learnt from the records

    # Now the stream carries obvious anomalies too: the live model's verdict keeps them out.
    rows = normal_rows(1500, 21)
    rows[::50] += 40.0
    produce(broker.bootstrap, topics["input"], rows)
    r = run_trainer(
        broker.bootstrap,
        topics["input"],
        out,
        "--epochs",
        "30",
        "--max-records",
        "1501",
        "--seed",
        "1",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"excluded_anomalies": ' in r.stderr
    excluded = int(r.stderr.split('"excluded_anomalies": ')[1].split(",")[0])
    assert excluded >= 30  # the 30 planted rows (and perhaps a few borderline ones)
    v2 = read_latest(out)
    assert v2 != v1 and r.stdout.strip().splitlines()[-1] == v2


def test_a_candidate_worse_than_the_live_model_is_not_published(broker, topics, tmp_path, trained):
    out = tmp_path / "models"
    _, _, good = trained
    live = publish(out, good.model, good.manifest)
    produce(broker.bootstrap, topics["input"], normal_rows(300, 22))
    # one epoch on a small snapshot: a clearly worse model than the live one
    # (300 rows hold out 75: they support a 5 % target, not the default 1 %)
    r = run_trainer(
        broker.bootstrap,
        topics["input"],
        out,
        *("--epochs", "1", "--lr", "0.0001", "--target-fpr", "0.05"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "not published" in r.stderr
    assert read_latest(out) == live and list_versions(out) == [live]


def test_missing_topic_is_one_line(broker, tmp_path):
    r = run_trainer(
        broker.bootstrap,
        "no-such-topic-" + os.urandom(4).hex(),
        tmp_path / "m",
        "--max-seconds",
        "5",
    )
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "m" / "LATEST").exists()


def test_a_drift_incident_retrains_on_the_records_since_it_opened(broker, topics, tmp_path):
    """Periodic mode with --incident-topic: the first cycle at once (the timer), then a
    drift incident on the incident topic retrains on the records after its opening."""
    out = tmp_path / "models"
    t0 = 1_764_000_000_000
    p = producer(broker.bootstrap)
    old = normal_rows(600, 40)
    for i, row in enumerate(old):
        p.send(topics["input"], value=codec.encode_json(row), timestamp_ms=t0 + i)
    p.flush()
    log = tmp_path / "trainer.log"
    flags = ["--out", str(out), "--max-seconds", "30", "--epochs", "10", "--every-seconds", "3600"]
    flags += ["--incident-topic", topics["incidents"], "--drift-delay-seconds", "1"]
    proc = start_trainer(broker.bootstrap, topics["input"], flags, log)
    try:
        v1 = wait_for(lambda: read_latest(out), 120, 0.5, "the first cycle", proc)
        # the operating point moves; the worker reports drift on the incident topic
        new = normal_rows(800, 41)
        new[:, 3] += 1.0
        for i, row in enumerate(new):
            p.send(topics["input"], value=codec.encode_json(row), timestamp_ms=t0 + 10_000 + i)
        p.send(topics["input"], value=codec.encode_json(new[0]), timestamp_ms=t0 + 5_000)
        incident = {"kind": "drift", "status": "open", "topic": topics["input"]}
        p.send(topics["incidents"], value=orjson.dumps({**incident, "started_at_ms": t0 + 9_000}))
        p.flush()
        v2 = wait_for(
            lambda: read_latest(out) not in (None, v1) and read_latest(out),
            120,
            0.5,
            "a retrain on drift",
            proc,
        )
        assert stop_worker(proc) == 0
    finally:
        p.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    snapshots = [orjson.loads(line) for line in text.splitlines() if '"snapshot"' in line]
    assert [s.get("since_ms") for s in snapshots] == [None, t0 + 9_000], text[-3000:]
    assert snapshots[1]["records"] == 800  # only the records after the opening
    assert snapshots[1]["rows"] == 800  # all of them: the live model no longer fits
    # the drift retrain is not held to the live model's errors (shadow gates it)
    assert "drift retrain: not compared with the live model" in text, text[-3000:]
    events = [orjson.loads(ln).get("event") for ln in text.splitlines() if ln.startswith("{")]
    after_drift = events[len(events) - events[::-1].index("snapshot") :]
    assert "candidate vs live" not in after_drift, after_drift
    assert v2 in text.split()
