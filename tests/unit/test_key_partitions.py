"""worker.clients.KeyPartitions: the partition a keyed output goes to is the one
kafka-python's default partitioner (the Java client's murmur2 rule) would give it."""

from __future__ import annotations

import random

from kafka.partitioner.default import DefaultPartitioner, murmur2

from worker.clients import KeyPartitions


class _Producer:
    def __init__(self, partitions):
        self.partitions = set(partitions)
        self.asked = []

    def partitions_for(self, topic):
        self.asked.append(topic)
        return self.partitions


class _Cluster:
    """What DefaultPartitioner reads of the producer's metadata."""

    def __init__(self, partitions):
        self.partitions = set(partitions)

    def topics(self):
        return {"out"}

    def partitions_for_topic(self, topic):
        return self.partitions

    def available_partitions_for_topic(self, topic):
        return self.partitions


def _records(keys):
    return [(k, b"v", []) for k in keys]


def test_keyed_records_go_where_the_default_partitioner_puts_them():
    rng = random.Random(0)
    keys = [rng.randbytes(rng.randrange(0, 40)) for _ in range(500)] + [b"", b"sensor-1"] * 3
    keys += [rng.randbytes(1000) for _ in range(5)]  # long keys: hashed, not kept
    default = DefaultPartitioner()
    for partitions in ([0], [0, 1, 2], list(range(7)), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]):
        kp = KeyPartitions()
        for _ in range(2):  # the second time from what it kept
            got = kp.of(_Producer(partitions), "out", _records(keys))
            want = [default.partition("out", k, k, b"v", b"v", _Cluster(partitions)) for k in keys]
            assert got == want
    assert all(len(k) <= KeyPartitions.MAX_KEY_BYTES for k in kp._hashes)
    assert len(kp._hashes) == len({k for k in keys if len(k) <= KeyPartitions.MAX_KEY_BYTES})


def test_keyless_records_are_left_to_the_producer():
    producer = _Producer([0, 1])
    got = KeyPartitions().of(producer, "out", _records([None, b"a", None]))
    assert got == [None, (murmur2(b"a") & 0x7FFFFFFF) % 2, None]
    assert KeyPartitions().of(producer, "out", _records([None, None])) == [None, None]
    assert producer.asked == ["out"]  # no metadata asked for keyless records alone


def test_kept_hashes_are_bounded(monkeypatch):
    monkeypatch.setattr(KeyPartitions, "MAX_KEYS", 10)
    kp = KeyPartitions()
    producer = _Producer(range(4))
    for i in range(35):
        kp.of(producer, "out", _records([b"key-%d" % i]))
        assert len(kp._hashes) <= 10
    assert producer.asked == ["out"] * 35  # the topic's partitions, once a call
