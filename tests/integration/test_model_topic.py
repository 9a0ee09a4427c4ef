"""Checkpoints over the model topic, against the real embedded broker: workers with
their own caches take each new version, a torn upload is never served, a late worker
takes the newest, a restart's replay never swaps back, the trainer publishes and prunes."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaProducer

from tests.integration.kafka_helpers import (
    events_of,
    producer,
    read_topic,
    unique,
    wait_for,
    worker_settings,
)
from tests.support import normal_rows
from training import cli
from worker import codec
from worker.checkpoint import LATEST_FILE, publish, read_checkpoint, read_latest
from worker.model_bundle import TopicState, pack, records_for, unpack
from worker.model_topic import PARTITION, TopicReader, publish_version
from worker.service import Worker
from worker.settings import KafkaSettings

CHUNK = 4096  # small, so every version travels in several chunks


@pytest.fixture
def model_topic(broker) -> str:
    from deploy.init_topics import ensure_model_topic

    topic = unique("models")
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        ensure_model_topic(admin, topic, 1)
    finally:
        admin.close()
    return topic


@pytest.fixture
def trainer_dir(tmp_path) -> Path:
    return tmp_path / "trainer"


def new_version(trained, root: Path, which: int = 1) -> str:
    """Publish the session's second (1) or first (2) trained model into `root`: a new
    version each time."""
    src_root, v1, second = trained
    if which == 1:
        return publish(root, second.model, second.manifest)
    first = read_checkpoint(src_root / v1)
    return publish(root, first.build_model(), first.manifest)


def kafka(broker) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=broker.bootstrap)


def to_topic(broker, topic: str, root: Path, version: str) -> None:
    publish_version(kafka(broker), topic, root / version, CHUNK)


def topic_worker(broker, topics, model_topic, cache: Path, **kw) -> Worker:
    settings = worker_settings(
        broker.bootstrap,
        topics,
        cache / "unused-model-dir",
        model_topic=model_topic,
        model_cache_dir=cache,
        emit="all",
        reload_poll_s=0.5,
        **kw,
    )
    return Worker(settings)


def run_in_thread(worker: Worker) -> threading.Thread:
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    return t


def stop(workers: list[Worker], threads: list[threading.Thread]) -> None:
    for w in workers:
        w.request_stop()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()


def send(bootstrap: str, topic: str, n: int, tag: str, seed: int) -> None:
    p = producer(bootstrap)
    for i, row in enumerate(normal_rows(n, seed)):
        p.send(topic, key=str(i % 7).encode(), value=codec.encode_json(row, id=f"{tag}{i}"))
    p.flush()
    p.close()


def serving(workers: list[Worker]) -> list[str | None]:
    return [w.scorer.version if w.scorer else None for w in workers]


def test_three_workers_with_their_own_caches_take_the_new_version_and_lose_nothing(
    broker, topics, model_topic, trained, trainer_dir, tmp_path
):
    v1 = new_version(trained, trainer_dir, which=2)
    to_topic(broker, model_topic, trainer_dir, v1)
    workers = [topic_worker(broker, topics, model_topic, tmp_path / f"cache{i}") for i in range(3)]
    threads = [run_in_thread(w) for w in workers]
    wait_for(
        lambda: all(
            w.metrics.registry.get_sample_value("cae_assigned_partitions") == 1 for w in workers
        ),
        60,
        0.2,
        "each worker holding one of the 3 partitions",
    )
    assert serving(workers) == [v1] * 3
    send(broker.bootstrap, topics["input"], 600, "a", seed=1)

    v2 = new_version(trained, trainer_dir)
    to_topic(broker, model_topic, trainer_dir, v2)
    wait_for(lambda: serving(workers) == [v2] * 3, 30, 0.05, "v2 serving on all three")
    send(broker.bootstrap, topics["input"], 600, "b", seed=2)
    wait_for(
        lambda: sum(w.summary.records for w in workers) >= 1200, 60, 0.2, "1200 records scored"
    )
    stop(workers, threads)

    events = events_of(read_topic(broker.bootstrap, topics["output"], expect=1200))
    ids = {e["id"] for e in events}
    assert ids == {f"a{i}" for i in range(600)} | {f"b{i}" for i in range(600)}, "none lost"
    assert {e["model"]["version"] for e in events if e["id"].startswith("b")} == {v2}
    assert all(w.summary.versions == [v1, v2] for w in workers)
    # each cache is its own and holds the serving version only
    assert [sorted(p.name for p in (tmp_path / f"cache{i}").iterdir()) for i in range(3)] == [
        [v2]
    ] * 3


def test_an_upload_interrupted_half_way_is_never_served(
    broker, topics, model_topic, trained, trainer_dir, tmp_path
):
    v1 = new_version(trained, trainer_dir)
    to_topic(broker, model_topic, trainer_dir, v1)
    worker = topic_worker(broker, topics, model_topic, tmp_path / "cache")
    thread = run_in_thread(worker)
    wait_for(lambda: worker.scorer is not None, 30, 0.1, "v1 serving")

    # the trainer dies half-way through v2: half its chunks, no commit record
    v2 = new_version(trained, trainer_dir, which=1)
    *chunks, commit = records_for(v2, "", pack(trainer_dir / v2), CHUNK)
    assert len(chunks) >= 4
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for r in chunks[: len(chunks) // 2]:
        p.send(model_topic, key=r.key, value=r.value, headers=r.headers, partition=PARTITION)
    p.flush()
    # then a commit for v3 whose middle chunk never arrived: it names the torn upload,
    # and its refusal shows the worker has read past the half upload of v2
    v3 = new_version(trained, trainer_dir, which=1)
    *chunks3, commit3 = records_for(v3, "", pack(trainer_dir / v3), CHUNK)
    for r in chunks3[:1] + chunks3[2:] + [commit3]:
        p.send(model_topic, key=r.key, value=r.value, headers=r.headers, partition=PARTITION)
    p.flush()
    p.close()
    wait_for(lambda: v3 in worker.watcher.refused, 30, 0.1, "the torn v3 refused")
    assert worker.watcher.refused == {v3: "IncompleteUpload"}
    refused = worker.metrics.registry.get_sample_value(
        "cae_model_reloads_total", {"result": "refused", "reason": "IncompleteUpload"}
    )
    assert refused == 1
    send(broker.bootstrap, topics["input"], 50, "x", seed=3)
    wait_for(lambda: worker.summary.records >= 50, 30, 0.1, "50 records scored")
    assert worker.scorer.version == v1, "the old model keeps serving"

    v4 = new_version(trained, trainer_dir, which=2)
    to_topic(broker, model_topic, trainer_dir, v4)
    wait_for(lambda: worker.scorer.version == v4, 30, 0.1, "v4 serving")
    stop([worker], [thread])
    assert worker.summary.versions == [v1, v4]
    events = events_of(read_topic(broker.bootstrap, topics["output"], expect=50))
    assert {e["model"]["version"] for e in events} == {v1}


def test_a_late_worker_serves_the_newest_and_a_restart_never_swaps_back(
    broker, topics, model_topic, trained, trainer_dir, tmp_path
):
    published = []
    for which in (1, 2, 1):
        published.append(new_version(trained, trainer_dir, which))
        to_topic(broker, model_topic, trainer_dir, published[-1])
    newest = published[-1]

    # exactly-once delivery: the model consumer is separate from the transactional clients
    worker = topic_worker(broker, topics, model_topic, tmp_path / "cache", delivery="exactly-once")
    thread = run_in_thread(worker)
    wait_for(lambda: worker.scorer is not None, 30, 0.1, "a model serving")
    assert worker.summary.versions == [newest], "the newest at once, nothing older on the way"
    send(broker.bootstrap, topics["input"], 40, "e", seed=4)
    wait_for(lambda: worker.summary.records >= 40, 60, 0.1, "40 records scored")
    stop([worker], [thread])
    events = events_of(
        read_topic(broker.bootstrap, topics["output"], expect=40, isolation_level="read_committed")
    )
    assert len(events) == 40 and {e["model"]["version"] for e in events} == {newest}

    # restarted on the same cache: the replay of the whole topic, then the oldest version
    # sent again, must not take it back
    restarted = topic_worker(broker, topics, model_topic, tmp_path / "cache")
    thread = run_in_thread(restarted)
    wait_for(lambda: restarted.scorer is not None, 30, 0.1, "a model serving after restart")
    to_topic(broker, model_topic, trainer_dir, published[0])
    later = new_version(trained, trainer_dir, 2)
    to_topic(broker, model_topic, trainer_dir, later)  # the sentinel: read after the resend
    wait_for(lambda: restarted.scorer.version == later, 30, 0.1, "the later version serving")
    stop([restarted], [thread])
    assert restarted.summary.versions == [newest, later]
    assert restarted.watcher.refused == {}


def test_the_trainer_publishes_to_the_topic_and_prunes_it(
    broker, model_topic, tmp_path, monkeypatch
):
    data = tmp_path / "normal.npy"
    np.save(data, normal_rows(300, 5))
    out = tmp_path / "models"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap)
    argv = [
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--keep",
        "1",
        "--target-fpr",
        "0.05",
    ]
    argv += ["--model-topic", model_topic, "--model-chunk-bytes", "2048"]
    assert cli.main(argv) == 0
    first = read_latest(out)
    assert cli.main(argv) == 0
    second = read_latest(out)
    assert second > first

    state = TopicState()
    reader = TopicReader(kafka(broker), model_topic)
    try:
        assert reader.catch_up(state, 30)
    finally:
        reader.close()
    assert state.complete() == [second], "the older version pruned with tombstones"
    payload, commit = state.payload(second)
    assert commit["chunks"] > 1
    got = tmp_path / "got"
    got.mkdir()
    unpack(payload, got)
    assert {p.name: p.read_bytes() for p in got.iterdir()} == {
        p.name: p.read_bytes() for p in (out / second).iterdir()
    }


def test_a_version_the_topic_does_not_take_is_not_published(tmp_path, monkeypatch, capsys):
    from deploy.embedded_broker import free_port

    data = tmp_path / "normal.npy"
    np.save(data, normal_rows(300, 5))
    out = tmp_path / "models"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")  # nobody there
    monkeypatch.setattr(cli, "TOPIC_TIMEOUT_S", 2.0)
    argv = [
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--target-fpr",
        "0.05",
        "--model-topic",
        "m",
    ]
    assert cli.main(argv) == cli.EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: publishing ") and "nothing was published" in err[-1]
    assert not (out / LATEST_FILE).exists()
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
