"""Per-entity incidents on the real broker (docs/contract.md#incidents): planted
episodes open one incident each on the right key and resolve; a replay yields the
same incidents; hostile keys are entities like any other."""

from __future__ import annotations

import orjson

from tests.integration.conftest import DIM
from tests.integration.kafka_helpers import (
    create_topics,
    incidents_of,
    producer,
    read_topic,
    unique,
    worker_settings,
)
from tests.support import normal_rows
from worker import codec
from worker.incidents import severity
from worker.service import Worker

T0 = 1_764_253_000_000
HUGE = b"\xfe\x00" + b"h" * 100_000  # binary and 100 KB
KEYS = [b"pump-0", b"pump-1", b"pump-2", b"", None, HUGE]
# key → the key's own rows (its 0th, 1st, … record) that are an episode
EPISODES = {b"pump-1": range(20, 32), HUGE: range(30, 42), b"": range(50, 62), None: range(80, 92)}
PER_KEY = 150
QUIET_MS = 5_000  # 50 rows of the stream, ~8 of one key


def produce_keyed(bootstrap: str, topic: str) -> dict:
    """PER_KEY rows per key, round robin, 100 ms of event time apart (JSON `ts`); the
    episodes' rows get a spike. Returns entity key → set of (partition, offset) of
    its anomalous rows as the broker stored them."""
    n = PER_KEY * len(KEYS)
    rows = normal_rows(n, seed=11)
    p = producer(bootstrap, max_request_size=2 * 1024 * 1024)
    sent = []
    for i in range(n):
        key = KEYS[i % len(KEYS)]
        own = i // len(KEYS)
        planted = own in EPISODES.get(key, ())
        if planted:
            rows[i, i % DIM] += 25.0
        value = codec.encode_json(rows[i], id=f"r{i}", ts=T0 + i * 100)
        # keyless records would spread over partitions: the test keeps them on one
        part = 0 if key is None else None
        sent.append((key, planted, p.send(topic, key=key, value=value, partition=part)))
    p.flush()
    p.close()
    planted: dict = {k: set() for k in EPISODES}
    for key, hit, future in sent:
        md = future.get(timeout=30)
        if hit:
            planted[key].add((md.partition, md.offset))
    return planted


def run_worker(broker, topics, model_dir, incident_topic, state_topic, group) -> None:
    s = worker_settings(
        broker.bootstrap,
        topics,
        model_dir,
        group_id=group,
        incident_topic=incident_topic,
        incident_state_topic=state_topic,
        incident_update_ms=1_000,
        incident_quiet_ms=QUIET_MS,
        max_records=PER_KEY * len(KEYS),
        max_record_bytes=256 * 1024,
    )
    summary = Worker(s).run()
    assert summary.records == PER_KEY * len(KEYS) and summary.rejected == 0


def test_planted_episodes_open_one_incident_each_and_a_replay_gives_the_same(
    broker, topics, model_dir
):
    planted = produce_keyed(broker.bootstrap, topics["input"])
    run_worker(broker, topics, model_dir, topics["incidents"], topics["state"], topics["group"])
    records = read_topic(broker.bootstrap, topics["incidents"], quiet_s=1.5)
    messages = incidents_of(records)
    by_id: dict = {}
    for rec, msg in zip(records, messages, strict=True):
        assert msg["key"] == (
            None if rec.key is None else rec.key.decode("utf-8", "backslashreplace")
        )
        by_id.setdefault(msg["incident_id"], []).append((rec.key, msg))
    # exactly one incident per episode, on the episode's key (exact bytes)
    keys = sorted((msgs[0][0] for msgs in by_id.values()), key=repr)
    assert keys == sorted(EPISODES, key=repr)
    for msgs in by_id.values():
        key = msgs[0][0]
        assert all(k == key for k, _ in msgs)
        statuses = [m["status"] for _, m in sorted(msgs, key=lambda km: km[1]["sequence"])]
        assert statuses[0] == "open" and statuses[-1] == "resolved"
        assert statuses.count("resolved") == 1
        opening = min((m for _, m in msgs), key=lambda m: m["sequence"])
        last = max((m for _, m in msgs), key=lambda m: m["sequence"])
        at = {
            end: (last["source"][end]["partition"], last["source"][end]["offset"])
            for end in ("first_anomaly", "last_anomaly")
        }
        # opened during the episode; spans it (a false positive just before or
        # after, within the window or the quiet period, belongs to it too)
        o = opening["source"]["last_anomaly"]
        assert (o["partition"], o["offset"]) in planted[key]
        assert at["first_anomaly"] <= min(planted[key]) and max(planted[key]) <= at["last_anomaly"]
        assert last["anomalies"] >= len(planted[key]) - 1 and last["resolution"] == "quiet"
        assert last["severity"] == severity(last["max_score_p_value"])
    # the changelog ends with every incident resolved: tombstones, or isolated anomalies
    state = read_topic(broker.bootstrap, topics["state"], quiet_s=1)
    live: dict = {}
    for rec in state:
        if rec.key != b"m":
            live[(rec.partition, rec.key)] = rec.value
    assert live and all(v is None or orjson.loads(v)["i"] is None for v in live.values())
    assert any(v is None for v in live.values())

    # Replay: the same input through a fresh group gives the same incidents.
    again = {"incidents": unique("incidents"), "state": unique("state")}
    create_topics(broker.bootstrap, list(again.values()))
    run_worker(broker, topics, model_dir, again["incidents"], again["state"], unique("group"))
    replayed = incidents_of(read_topic(broker.bootstrap, again["incidents"], quiet_s=1.5))

    def canonical(msgs):
        return sorted(orjson.dumps(m, option=orjson.OPT_SORT_KEYS) for m in msgs)

    assert canonical(replayed) == canonical(messages)


def test_the_changelog_is_restored_to_its_last_record_also_when_written_in_one_batch(
    broker, topics, tmp_path
):
    """A batch's changelog records go out together, its marker last. Tansu answers a
    partition's end offset with its last batch's base offset + 1 (Kafka: the last
    offset + 1); the restore must still apply the whole last batch, marker included."""
    from kafka import KafkaProducer

    from tests.integration.kafka_helpers import worker_settings
    from worker.incident_records import MARKER_KEY, state_key
    from worker.incident_state import read_state

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=50)
    for i in range(20):
        producer.send(topics["state"], key=state_key(b"key-%d" % i), value=b"s%d" % i, partition=0)
    marker = orjson.dumps({"applied": 1234, "stream_ms": 5678})
    producer.send(topics["state"], key=MARKER_KEY, value=marker, partition=0)
    producer.flush()
    producer.close()
    settings = worker_settings(broker.bootstrap, topics, tmp_path)
    restored, read = read_state(settings, [0], timeout_s=20)
    states, applied, stream_ms = restored[0]
    assert read == 21
    assert (applied, stream_ms) == (1234, 5678)
    assert states == {b"key-%d" % i: b"s%d" % i for i in range(20)}


def test_a_stuck_sensor_opens_one_incident_that_names_it(broker, topics, model_dir):
    """pump-1's sensor s3 holds one reading for 40 of its records while the others move;
    its rows look normal to the model, so no event goes out for them, but its incident
    opens (docs/contract.md#stuck-features). The other keys' rows never repeat."""
    keys, per_key, frozen = [b"pump-0", b"pump-1", b"pump-2"], 100, range(30, 70)
    rows = normal_rows(per_key * len(keys), seed=12)
    p = producer(broker.bootstrap)
    sent = []
    for i, row in enumerate(rows):
        key, own = keys[i % len(keys)], i // len(keys)
        if key == b"pump-1" and own in frozen:
            row[3] = rows[len(keys) * frozen[0] + 1, 3]  # pump-1's reading at its 30th record
        value = codec.encode_json(row, id=f"r{i}", ts=T0 + i * 100)
        sent.append((key, own, p.send(topics["input"], key=key, value=value)))
    p.flush()
    p.close()
    stuck_at = {
        (md.partition, md.offset)
        for key, own, f in sent
        if key == b"pump-1" and own in frozen
        for md in [f.get(timeout=30)]
    }
    s = worker_settings(
        broker.bootstrap,
        topics,
        model_dir,
        incident_quiet_ms=QUIET_MS,
        max_records=len(rows),
    )
    assert Worker(s).run().records == len(rows)
    messages = incidents_of(read_topic(broker.bootstrap, topics["incidents"], quiet_s=1.5))
    by_key = {m["key"] for m in messages}
    assert by_key == {"pump-1"} and len({m["incident_id"] for m in messages}) == 1
    last = max(messages, key=lambda m: m["sequence"])
    assert last["stuck_features"] == ["s3"] and last["status"] == "resolved"
    # opened by a stuck row (a false positive of the model just before may start it)
    opening = min(messages, key=lambda m: m["sequence"])["source"]["last_anomaly"]
    assert (opening["partition"], opening["offset"]) in stuck_at
    end = last["source"]["last_anomaly"]
    assert (end["partition"], end["offset"]) >= max(stuck_at)  # spans the stuck rows
    assert last["anomalies"] >= len(frozen) - 4  # from the 5th equal reading on
    # the stuck rows are not anomaly events: those stay the model's decision
    events = read_topic(broker.bootstrap, topics["output"], quiet_s=1)
    flagged = {
        (e["source"]["partition"], e["source"]["offset"])
        for e in map(orjson.loads, (r.value for r in events))
    }
    assert len(flagged & stuck_at) < len(stuck_at) // 4
