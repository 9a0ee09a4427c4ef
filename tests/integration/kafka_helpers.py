"""Helpers for tests against the embedded broker: topics, producing, reading back, workers."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.structs import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from tests.support import stop_worker, wait_for
from worker.events import event_schema
from worker.incidents import incident_schema
from worker.settings import KafkaSettings, WorkerSettings

__all__ = ["stop_worker", "wait_for"]  # shared with the unit tier, re-exported here

ROOT = Path(__file__).resolve().parents[2]
FAST_GROUP = dict(session_timeout_ms=6000, heartbeat_interval_ms=1000)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        admin.close()


def new_topics(bootstrap: str, partitions: int = 3) -> dict[str, str]:
    """Fresh input, output, DLQ, incident and incident-state topics (created) and a
    fresh group name."""
    t = {
        "input": unique("features"),
        "output": unique("anomalies"),
        "dlq": unique("dlq"),
        "incidents": unique("incidents"),
        "state": unique("incidents-state"),
        "group": unique("group"),
    }
    names = [t["input"], t["output"], t["dlq"], t["incidents"], t["state"]]
    create_topics(bootstrap, names, partitions=partitions)
    return t


def producer(bootstrap: str, **kw) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, **{"acks": "all", "linger_ms": 5, **kw})


def read_topic(
    bootstrap: str,
    topic: str,
    expect: int | None = None,
    timeout_s: float = 30.0,
    quiet_s: float = 2.0,
    isolation_level: str = "read_uncommitted",
) -> list:
    """Every record of `topic` from the beginning (no group). Stops at `expect`
    records, or after `quiet_s` without new records once anything (or nothing) came."""
    c = KafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level=isolation_level, enable_auto_commit=False
    )
    try:
        parts = wait_for(
            lambda: c.partitions_for_topic(topic), 10, 0.2, f"the partitions of {topic}"
        )
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        out: list = []
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = c.poll(timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
            if batch:
                last_new = time.monotonic()
            if expect is not None and len(out) >= expect:
                # linger briefly: duplicates must show up too
                if time.monotonic() - last_new >= 0.5:
                    break
            elif expect is None and time.monotonic() - last_new >= quiet_s:
                break
        return out
    finally:
        c.close()


def broker_hides_aborted(bootstrap: str) -> bool:
    """Whether read_committed consumers of this broker skip aborted transactions'
    records. Apache Kafka does; Tansu 0.6 does not (docs/reliability.md)."""
    topic = unique("aborted-probe")
    create_topics(bootstrap, [topic], partitions=1)
    p = KafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=unique("probe"), enable_idempotence=True
    )
    try:
        p.init_transactions()
        p.begin_transaction()
        p.send(topic, b"aborted")
        p.flush()
        p.abort_transaction()
        p.begin_transaction()
        p.send(topic, b"committed")
        p.commit_transaction()
    finally:
        p.close()
    seen = [
        r.value for r in read_topic(bootstrap, topic, expect=1, isolation_level="read_committed")
    ]
    return seen == [b"committed"]


@functools.cache
def _event_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(event_schema())


@functools.cache
def _incident_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(incident_schema())


def incidents_of(records: list) -> list[dict]:
    """The incident messages in records, each validated against worker/incident.schema.json."""
    messages = [orjson.loads(r.value) for r in records]
    for message in messages:
        _incident_validator().validate(message)
    return messages


def events_of(records: list) -> list[dict]:
    """The events in output records, each validated against worker/event.schema.json."""
    events = [orjson.loads(r.value) for r in records]
    for event in events:
        _event_validator().validate(event)
    return events


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offs = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {
        tp.partition: om.offset for tp, om in offs.items() if tp.topic == topic and om.offset >= 0
    }


def worker_settings(bootstrap: str, topics: dict, model_dir: Path, **kw) -> WorkerSettings:
    """Settings for an in-process worker on the test topics; `kw` overrides."""
    base = dict(
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        input_topic=topics["input"],
        output_topic=topics["output"],
        dlq_topic=topics["dlq"],
        incident_topic=topics.get("incidents", "none"),
        incident_state_topic=topics.get("state", "none"),
        group_id=topics["group"],
        model_dir=model_dir,
        metrics_port=0,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        reload_poll_s=0.2,
        wait_for_model_s=10,
    )
    return WorkerSettings(**{**base, **kw})


def worker_env(bootstrap: str, topics: dict, model_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "KAFKA_"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        WORKER_INPUT_TOPIC=topics["input"],
        WORKER_OUTPUT_TOPIC=topics["output"],
        WORKER_DLQ_TOPIC=topics["dlq"],
        WORKER_INCIDENT_TOPIC=topics.get("incidents", "none"),
        WORKER_INCIDENT_STATE_TOPIC=topics.get("state", "none"),
        WORKER_GROUP_ID=topics["group"],
        WORKER_MODEL_DIR=str(model_dir),
        WORKER_METRICS_PORT="0",
        WORKER_SESSION_TIMEOUT_MS="6000",
        WORKER_HEARTBEAT_INTERVAL_MS="1000",
        WORKER_RELOAD_POLL_S="0.2",
        WORKER_LOG_LEVEL="DEBUG",  # per-batch offsets in the log, for diagnosing a failure
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _spawn(args: list[str], env: dict, log_path: Path, mode: str) -> subprocess.Popen:
    """`python ARGS` from the repository root, stdout and stderr to log_path."""
    log = open(log_path, mode)  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            [sys.executable, *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    finally:
        log.close()


def start_worker(env: dict, log_path: Path) -> subprocess.Popen:
    return _spawn(["-m", "worker"], env, log_path, "ab")


def start_trainer(bootstrap: str, input_topic: str, flags: list[str], log_path: Path):
    """`python -m training --from-kafka FLAGS` as its own process, reading `input_topic`
    on `bootstrap`; no TRAINER_*/KAFKA_* setting leaks in from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINER_", "KAFKA_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=bootstrap, TRAINER_INPUT_TOPIC=input_topic)
    return _spawn(["-m", "training", "--from-kafka", *flags], env, log_path, "wb")


def copy_model_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def http_get(port: int, path: str) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def metric_total(port: int, name: str, **labels: str) -> float:
    """Sum of a metric's samples on a worker's /metrics over the label sets that include
    `labels`. Raises OSError while nothing listens on the port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
        text = r.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def log_events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass
    return out
