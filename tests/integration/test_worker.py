"""The worker against the real embedded broker: formats, DLQ, reload, delivery, shutdown."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import numpy as np
import orjson
import pytest
from kafka.errors import KafkaConnectionError, KafkaError
from kafka.future import Future
from kafka.partitioner.default import murmur2

from deploy.embedded_broker import free_port
from tests.integration.conftest import DIM, FEATURES
from tests.integration.kafka_helpers import (
    broker_hides_aborted,
    committed_offsets,
    events_of,
    log_events,
    metric_total,
    producer,
    read_topic,
    start_worker,
    stop_worker,
    wait_for,
    worker_env,
    worker_settings,
)
from tests.support import normal_rows
from worker import codec
from worker.checkpoint import LATEST_FILE, WEIGHTS_FILE, publish
from worker.clients import open_clients, producer_config
from worker.service import Worker
from worker.settings import WorkerSettings


def settings_for(broker, topics, model_dir, **kw) -> WorkerSettings:
    return worker_settings(broker.bootstrap, topics, model_dir, **kw)


def produce_mixed(bootstrap, topic, n, seed=0, spike_every=50):
    """n valid records alternating JSON forms and float32; every spike_every-th is a spike.
    Returns the rows, the spikes' indices and the (partition, offset) the broker gave each."""
    rows = normal_rows(n, seed)
    spikes = set(range(0, n, spike_every))
    for i in spikes:
        rows[i, i % DIM] += 25.0
    p = producer(bootstrap)
    sent = []
    for i, row in enumerate(rows):
        key = f"sensor-{i % 5}".encode()
        kind = i % 4
        if kind == 0:
            value = codec.encode_json(row, id=f"r{i}", ts=1_764_253_000_000 + i)
            sent.append(p.send(topic, key=key, value=value))
        elif kind == 1:
            sent.append(p.send(topic, key=key, value=orjson.dumps([float(v) for v in row])))
        elif kind == 2:
            doc = {
                "id": f"r{i}",
                "features": {name: float(v) for name, v in zip(FEATURES, row, strict=True)},
            }
            sent.append(p.send(topic, key=key, value=orjson.dumps(doc)))
        else:
            value, headers = codec.encode_float32(row)
            sent.append(p.send(topic, key=key, value=value, headers=headers))
    p.flush()
    p.close()
    acked = [future.get(timeout=30) for future in sent]
    return rows, spikes, [(md.partition, md.offset) for md in acked]


def run_in_thread(worker: Worker) -> threading.Thread:
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    return t


def event_ids(events):
    return [e["event_id"] for e in events]


def test_json_and_binary_records_each_get_one_valid_event(broker, topics, model_dir):
    n = 400
    rows, spikes, produced = produce_mixed(broker.bootstrap, topics["input"], n)
    worker = Worker(settings_for(broker, topics, model_dir, emit="all", max_records=n))
    summary = worker.run()
    assert summary.records == n and summary.rejected == 0

    records = read_topic(broker.bootstrap, topics["output"], expect=n)
    events = events_of(records)
    assert len(events) == n
    assert len(set(event_ids(events))) == n
    # every produced record has its event, keys pass through, model version in headers
    assert len(set(produced)) == n
    assert {(e["source"]["partition"], e["source"]["offset"]) for e in events} == set(produced)
    for rec, ev in zip(records, events, strict=True):
        assert rec.key.decode() == ev["source"]["key"]
        assert dict(rec.headers)["model.version"].decode() == ev["model"]["version"]
        # in the partition Kafka's default partitioner gives the key (3 partitions)
        assert rec.partition == (murmur2(rec.key) & 0x7FFFFFFF) % 3
    assert len({rec.partition for rec in records}) > 1
    # planted spikes are flagged, and they explain themselves through the spiked feature
    by_id = {e["id"]: e for e in events if e["id"]}
    flagged = [e for e in events if e["is_anomaly"]]
    spiked_ids = {f"r{i}" for i in spikes if i % 4 in (0, 2)}
    assert spiked_ids and all(by_id[i]["is_anomaly"] for i in spiked_ids)
    for i in spikes:
        if f"r{i}" in by_id:
            top = by_id[f"r{i}"]["top_features"][0]
            assert top["name"] == FEATURES[i % DIM]
            assert top["value"] == pytest.approx(float(rows[i, i % DIM]), rel=1e-6)
    assert len(flagged) < len(spikes) + 0.05 * n  # and normal traffic is mostly quiet
    # committed offsets cover every record
    committed = committed_offsets(broker.bootstrap, topics["group"], topics["input"])
    assert sum(committed.values()) == n


BAD_RECORDS = [
    (b"\xff\xfe\x00garbage", None, codec.UNDECODABLE),
    (b"{not json", None, codec.INVALID_JSON),
    (b'"just a string"', None, codec.BAD_SHAPE),
    (b'{"features": "1,2,3"}', None, codec.BAD_SHAPE),
    (orjson.dumps({"features": [1.0] * (DIM - 1)}), None, codec.DIMENSION_MISMATCH),
    (orjson.dumps({"features": [1.0] * (DIM - 1) + ["x"]}), None, codec.BAD_TYPE),
    (orjson.dumps({"features": {n: 1.0 for n in FEATURES[:-1]}}), None, codec.MISSING_FEATURES),
    (
        orjson.dumps({"features": {**{n: 1.0 for n in FEATURES[:-1]}, "bogus": 1.0}}),
        None,
        codec.MISSING_FEATURES,
    ),
    (
        orjson.dumps({"features": {**{n: 1.0 for n in FEATURES}, "bogus": 1.0}}),
        None,
        codec.UNKNOWN_FEATURES,
    ),
    (orjson.dumps({"features": [1.0] * (DIM - 1) + [1e39]}), None, codec.NON_FINITE),
    (
        np.array([np.nan] * DIM, dtype="<f4").tobytes(),
        [(codec.CONTENT_TYPE, codec.FLOAT32)],
        codec.NON_FINITE,
    ),
    (b"\x00" * (4 * DIM - 1), [(codec.CONTENT_TYPE, codec.FLOAT32)], codec.DIMENSION_MISMATCH),
    (b"x" * 5000, None, codec.OVERSIZE),
    (b"[1]", [(codec.CONTENT_TYPE, b"application/avro")], codec.UNKNOWN_CONTENT_TYPE),
]


def test_each_bad_record_lands_in_the_dlq_and_its_neighbours_are_scored(broker, topics, model_dir):
    p = producer(broker.bootstrap)
    good = normal_rows(len(BAD_RECORDS) + 1, seed=3)
    # one partition keeps neighbours adjacent: good, bad, good, bad, ..., good
    for i, (value, headers, _code) in enumerate(BAD_RECORDS):
        p.send(
            topics["input"], key=b"g", value=codec.encode_json(good[i], id=f"good{i}"), partition=0
        )
        p.send(topics["input"], key=b"b", value=value, headers=headers, partition=0)
    p.send(topics["input"], key=b"g", value=codec.encode_json(good[-1], id="goodlast"), partition=0)
    p.flush()
    total = 2 * len(BAD_RECORDS) + 1
    summary = Worker(
        settings_for(
            broker, topics, model_dir, emit="all", max_records=total, max_record_bytes=4096
        )
    ).run()
    assert summary.rejected == len(BAD_RECORDS)

    dlq = read_topic(broker.bootstrap, topics["dlq"], expect=len(BAD_RECORDS))
    assert len(dlq) == len(BAD_RECORDS)
    by_value = {r.value: r for r in dlq}
    for value, _headers, code in BAD_RECORDS:
        rec = by_value[value]
        h = dict(rec.headers)
        assert h["error"].decode() == code, (value[:40], h)
        assert h["error.detail"]
        assert h["source.topic"].decode() == topics["input"]
        assert h["source.partition"] == b"0"
        assert int(h["source.offset"]) % 2 == 1  # the odd offsets were the bad ones
        assert rec.key == b"b"
    scored = events_of(read_topic(broker.bootstrap, topics["output"], expect=len(BAD_RECORDS) + 1))
    assert sorted(e["id"] for e in scored) == sorted(
        [f"good{i}" for i in range(len(BAD_RECORDS))] + ["goodlast"]
    )


def test_hot_reload_mid_stream_and_corrupt_checkpoint_is_refused(
    broker, topics, model_dir, trained, tmp_path
):
    _, v1, second = trained
    worker = Worker(settings_for(broker, topics, model_dir, emit="all", idle_timeout_s=30))
    thread = run_in_thread(worker)
    p = producer(broker.bootstrap)

    def send(rows, tag):
        for i, row in enumerate(rows):
            p.send(topics["input"], value=codec.encode_json(row, id=f"{tag}{i}"))
        p.flush()

    send(normal_rows(100, 10), "a")
    wait_for(lambda: worker.summary.records >= 100, 30, 0.1, "100 records scored")
    v2 = publish(model_dir, second.model, second.manifest)
    wait_for(lambda: worker.scorer.version == v2, 30, 0.1, "v2 serving")
    send(normal_rows(100, 11), "b")
    wait_for(lambda: worker.summary.records >= 200, 30, 0.1, "200 records scored")
    assert worker.scorer.version == v2

    # a tampered checkpoint: LATEST moves to it, verification refuses it, v2 keeps serving
    staging = tmp_path / "staging"
    v3 = publish(staging, second.model, second.manifest)
    weights = staging / v3 / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (staging / v3).rename(model_dir / v3)
    (model_dir / "LATEST.tmp").write_text(v3 + "\n")
    (model_dir / "LATEST.tmp").rename(model_dir / LATEST_FILE)
    wait_for(lambda: v3 in worker.watcher.refused, 30, 0.1, "v3 refused")
    send(normal_rows(100, 12), "c")
    wait_for(lambda: worker.summary.records >= 300, 30, 0.1, "300 records scored")
    worker.request_stop()
    thread.join(timeout=30)
    assert not thread.is_alive()

    events = events_of(read_topic(broker.bootstrap, topics["output"], expect=300))
    assert len(events) == 300 and len(set(event_ids(events))) == 300
    version_of = {e["id"]: e["model"]["version"] for e in events}
    assert {version_of[f"a{i}"] for i in range(100)} == {v1}
    assert {version_of[f"b{i}"] for i in range(100)} == {v2}
    assert {version_of[f"c{i}"] for i in range(100)} == {v2}
    assert worker.watcher.refused[v3] == "IntegrityError"
    refused = worker.metrics.reloads.labels(result="refused", reason="IntegrityError")._value.get()
    assert refused == 1


def _produce_stream(bootstrap, topic, n, rate_per_s=None, tag="x"):
    p = producer(bootstrap)
    rows = normal_rows(n, seed=7)
    start = time.monotonic()
    for i, row in enumerate(rows):
        p.send(topic, key=str(i % 11).encode(), value=codec.encode_json(row, id=f"{tag}{i}"))
        if rate_per_s and i % 100 == 99:
            p.flush()
            ahead = (i + 1) / rate_per_s - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    p.flush()
    p.close()


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_kill_9_mid_stream_then_restart_loses_nothing(
    broker, topics, model_dir, tmp_path, delivery
):
    n = 6000
    env = worker_env(
        broker.bootstrap,
        topics,
        model_dir,
        WORKER_EMIT="all",
        WORKER_DELIVERY=delivery,
        WORKER_MAX_BATCH_SIZE=200,
        WORKER_TRANSACTIONAL_ID=topics["group"] + "-w1",
    )
    log1 = tmp_path / "w1.log"
    producer_thread = threading.Thread(
        target=_produce_stream, args=(broker.bootstrap, topics["input"], n, 1000)
    )

    def committed():
        return sum(committed_offsets(broker.bootstrap, topics["group"], topics["input"]).values())

    proc = start_worker(env, log1)
    try:
        # The producer, not the worker, sets the pace (6 s of stream at 1000/s), and
        # it starts once the worker holds its partitions: a backlog would be drained
        # in about a second, between two progress checks, and the kill would miss.
        wait_for(
            lambda: any(e.get("event") == "partitions_assigned" for e in log_events(log1)),
            120,
            0.2,
            "the worker's partitions",
        )
        producer_thread.start()
        # let it score part of the stream, then kill it without warning
        wait_for(lambda: committed() > 500, 60, 0.1, "500 records committed")
    finally:
        proc.kill()
        proc.wait()
    producer_thread.join()
    done_before = committed()
    assert 0 < done_before < n, "the kill should land mid-stream"

    proc = start_worker({**env, "WORKER_IDLE_TIMEOUT_S": "8"}, tmp_path / "w2.log")
    assert proc.wait(timeout=120) == 0, (tmp_path / "w2.log").read_text()[-3000:]
    assert committed() == n

    isolation = "read_committed" if delivery == "exactly-once" else "read_uncommitted"
    events = events_of(
        read_topic(
            broker.bootstrap, topics["output"], expect=n, isolation_level=isolation, timeout_s=60
        )
    )
    ids = Counter(e["event_id"] for e in events)
    assert {e["id"] for e in events} == {f"x{i}" for i in range(n)}  # nothing lost
    if delivery == "exactly-once":
        assert len(ids) == n, "every input record has exactly one event id"
        if broker_hides_aborted(broker.bootstrap):
            assert len(events) == n, "a read_committed consumer must see no duplicate"
        else:  # Tansu 0.6 shows the killed worker's aborted batch too: at most one batch twice
            assert max(ids.values()) <= 2 and len(events) - n <= 200


def test_sigterm_drains_the_batch_in_hand_and_commits_it(broker, topics, model_dir, tmp_path):
    # Batches of 100 that are not due for 15 s: of a 250-record backlog, two full
    # batches are scored and committed at once, and the last 50 records are polled
    # right after and held. SIGTERM then has an uncommitted batch to drain.
    n, batch, wait_s = 250, 100, 15
    _produce_stream(broker.bootstrap, topics["input"], n)
    log = tmp_path / "w.log"
    env = worker_env(
        broker.bootstrap,
        topics,
        model_dir,
        WORKER_EMIT="all",
        WORKER_MAX_BATCH_SIZE=batch,
        WORKER_MAX_BATCH_WAIT_MS=wait_s * 1000,
    )
    proc = start_worker(env, log)

    def committed() -> int:
        return sum(committed_offsets(broker.bootstrap, topics["group"], topics["input"]).values())

    try:
        wait_for(lambda: committed() >= 2 * batch, 60, 0.1, "two full batches committed", proc)
    finally:
        held_back = committed()
        t0 = time.monotonic()
        code = stop_worker(proc, signal.SIGTERM, timeout_s=wait_s + 15)
    drain_s = time.monotonic() - t0
    assert held_back == 2 * batch, f"{held_back} committed when SIGTERM arrived"
    assert code == 0, log.read_text()[-3000:]
    stopped = [e for e in log_events(log) if e.get("event") == "worker_stopped"]
    assert stopped and stopped[-1]["records"] == n, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    assert committed() == n, "the drained batch is committed"
    events = events_of(read_topic(broker.bootstrap, topics["output"], expect=n))
    assert sorted(e["id"] for e in events) == sorted(f"x{i}" for i in range(n))
    # the stop is honoured at the next poll slice, not when the held batch comes due
    assert drain_s < wait_s / 2, f"the drain took {drain_s:.1f}s"


def test_two_workers_split_partitions_and_score_everything(broker, topics, model_dir, tmp_path):
    n = 4000
    env = worker_env(
        broker.bootstrap, topics, model_dir, WORKER_EMIT="all", WORKER_IDLE_TIMEOUT_S="8"
    )
    ports = [free_port(), free_port()]
    procs = [
        start_worker({**env, "WORKER_METRICS_PORT": str(port)}, tmp_path / f"w{i}.log")
        for i, port in enumerate(ports)
    ]

    # both hold partitions (the gauge each one exports) before the stream starts
    def partitions_held() -> list[float]:
        try:
            return [metric_total(port, "cae_assigned_partitions") for port in ports]
        except OSError:  # a metrics port not listening yet
            return [0.0, 0.0]

    def split_between_both() -> bool:
        held = partitions_held()
        return all(held) and sum(held) == 3

    wait_for(split_between_both, 60, 0.2, "both workers holding the 3 partitions between them")
    _produce_stream(broker.bootstrap, topics["input"], n, rate_per_s=2000)
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=120) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    events = events_of(read_topic(broker.bootstrap, topics["output"], expect=n))
    assert {e["id"] for e in events} == {f"x{i}" for i in range(n)}
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    scored = [
        int(orjson.loads([ln for ln in log.splitlines() if "worker_stopped" in ln][-1])["records"])
        for log in logs
    ]
    assert all(s > 0 for s in scored), f"both workers must take part: {scored}"


def test_failing_publish_commits_nothing(broker, topics, model_dir):
    n = 300
    _produce_stream(broker.bootstrap, topics["input"], n)
    failures = {"left": 3, "failed_since_rewind": False}
    seen_commits = []

    def open_then_break_publishing(*args):
        clients = open_clients(*args)
        real_send = clients.producer.send
        real_seek = clients.consumer.seek
        real_commit, real_commit_async = clients.consumer.commit, clients.consumer.commit_async

        def send(topic, **kw):
            if failures["left"] > 0:
                failures["failed_since_rewind"] = True
                return Future().failure(KafkaError("injected: broker refused the write"))
            return real_send(topic, **kw)

        def seek(tp, offset):  # a rewind seeks each partition: count one failure per rewind
            if failures["failed_since_rewind"]:
                failures["failed_since_rewind"] = False
                failures["left"] -= 1
            return real_seek(tp, offset)

        def commit(offsets=None, **kw):
            seen_commits.append(failures["left"])
            return real_commit(offsets, **kw)

        def commit_async(offsets=None, **kw):
            seen_commits.append(failures["left"])
            return real_commit_async(offsets, **kw)

        clients.producer.send = send
        clients.consumer.seek = seek
        clients.consumer.commit = commit
        clients.consumer.commit_async = commit_async
        return clients

    settings = settings_for(broker, topics, model_dir, emit="all", max_records=n)
    summary = Worker(settings, open_clients=open_then_break_publishing).run()
    assert summary.publish_failures == 3
    assert seen_commits, "the worker commits"
    assert all(left == 0 for left in seen_commits), "no commit may happen while publishing fails"
    assert sum(committed_offsets(broker.bootstrap, topics["group"], topics["input"]).values()) == n
    events = events_of(read_topic(broker.bootstrap, topics["output"], expect=n))
    assert {e["id"] for e in events} == {f"x{i}" for i in range(n)}


def test_outputs_failing_mid_stream_lose_nothing_and_commit_nothing_past_a_failure(
    broker, topics, model_dir
):
    # Small batches, several in flight; after 1000 outputs every send fails for 1.5 s.
    # Each commit may cover only records whose event the broker acknowledged.
    n, fail_after, fail_s = 3000, 1000, 1.5
    _produce_stream(broker.bootstrap, topics["input"], n)
    sent: list[tuple[int, int, Future]] = []  # (source partition, source offset, future)
    window = {"start": None}
    violations, depths = [], []
    worker: Worker

    def failing(now: float) -> bool:
        if window["start"] is None and len(sent) >= fail_after:
            window["start"] = now
        return window["start"] is not None and now - window["start"] < fail_s

    def open_with_a_failing_spell(*args):
        clients = open_clients(*args)
        real_send, real_commit_async = clients.producer.send, clients.consumer.commit_async
        real_commit = clients.consumer.commit

        def send(topic, **kw):
            if failing(time.monotonic()):
                future = Future().failure(KafkaError("injected: broker refused the write"))
            else:
                future = real_send(topic, **kw)
            if topic == topics["output"]:  # incident messages and state fail alike, uncounted
                source = orjson.loads(kw["value"])["source"]
                sent.append((source["partition"], source["offset"], future))
                depths.append(len(worker.delivery.pipeline))
            return future

        def check(offsets):
            acked = {(p, o) for p, o, f in sent if f.succeeded()}
            for tp, om in offsets.items():
                missing = [o for o in range(om.offset) if (tp.partition, o) not in acked]
                if missing:
                    violations.append((tp.partition, om.offset, missing[:5]))

        def commit_async(offsets=None, **kw):
            check(offsets)
            return real_commit_async(offsets, **kw)

        def commit(offsets=None, **kw):
            check(offsets)
            return real_commit(offsets, **kw)

        clients.producer.send = send
        clients.consumer.commit_async = commit_async
        clients.consumer.commit = commit
        return clients

    settings = settings_for(broker, topics, model_dir, emit="all", max_records=n, max_batch_size=50)
    worker = Worker(settings, open_clients=open_with_a_failing_spell)
    summary = worker.run()
    assert not violations, f"committed past unacknowledged records: {violations[:3]}"
    assert window["start"] is not None and summary.publish_failures >= 1
    assert max(depths) >= 1, "batches were sent while earlier ones were in flight"
    assert sum(committed_offsets(broker.bootstrap, topics["group"], topics["input"]).values()) == n
    events = events_of(read_topic(broker.bootstrap, topics["output"]))  # duplicates too
    assert {e["id"] for e in events} == {f"x{i}" for i in range(n)}


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_compressed_input_and_output_topics(broker, topics, model_dir, compression):
    n = 200
    rows = normal_rows(n, seed=5)
    p = producer(broker.bootstrap, compression_type=compression)
    for i, row in enumerate(rows):
        p.send(topics["input"], value=codec.encode_json(row, id=f"z{i}"))
    p.flush()
    p.close()
    settings = settings_for(
        broker, topics, model_dir, emit="all", max_records=n, compression=compression
    )
    assert producer_config(settings)["compression_type"] == compression
    Worker(settings).run()
    events = events_of(read_topic(broker.bootstrap, topics["output"], expect=n))
    assert sorted(e["id"] for e in events) == sorted(f"z{i}" for i in range(n))


def test_multi_row_records_get_one_event_per_row(broker, topics, model_dir):
    rows = normal_rows(3 * 64, seed=6)
    rows[70, 2] += 30.0  # record 1, row 6
    p = producer(broker.bootstrap)
    for r in range(3):
        value, headers = codec.encode_float32_rows(rows[r * 64 : (r + 1) * 64])
        p.send(topics["input"], key=b"batch", value=value, headers=headers, partition=0)
    p.flush()
    p.close()
    summary = Worker(settings_for(broker, topics, model_dir, emit="all", max_records=3)).run()
    assert summary.records == 3 and summary.rows == 192
    events = events_of(read_topic(broker.bootstrap, topics["output"], expect=192))
    ids = {e["event_id"] for e in events}
    assert len(ids) == 192
    assert {(e["source"]["offset"], e["source"]["row"]) for e in events} == {
        (o, r) for o in range(3) for r in range(64)
    }
    flagged = [e for e in events if e["is_anomaly"]]
    assert any(e["source"]["offset"] == 1 and e["source"]["row"] == 6 for e in flagged)


def test_a_poll_that_raises_a_connection_error_is_retried(broker, topics, model_dir):
    n = 200
    _produce_stream(broker.bootstrap, topics["input"], n)
    raised = []

    def open_then_break_two_polls(*args):
        clients = open_clients(*args)
        real_poll = clients.consumer.poll

        def poll(*a, **kw):
            if len(raised) < 2:
                raised.append(1)
                raise KafkaConnectionError("injected: socket disconnected")
            return real_poll(*a, **kw)

        clients.consumer.poll = poll
        return clients

    settings = settings_for(broker, topics, model_dir, emit="all", max_records=n)
    summary = Worker(settings, open_clients=open_then_break_two_polls).run()
    assert len(raised) == 2 and summary.records == n
    events = events_of(read_topic(broker.bootstrap, topics["output"], expect=n))
    assert {e["id"] for e in events} == {f"x{i}" for i in range(n)}
