"""The stuck-feature watch (worker/repeats.py) against a per-row dict oracle: random
keyed streams with sensors that stick and come loose, several partitions, multi-row
records, batches delivered or rolled back and read again, evictions and dropped
partitions. After every batch both must flag the same rows and features."""

from __future__ import annotations

import numpy as np
import pytest

from worker.repeats import MEMORY_BYTES, RepeatWatch


def observe(watch, partition, keys, record, x, continuous):
    """watch.observe for rows of partitions `partition` [N] and records `record` [N]."""
    rec_p = np.full(len(keys), -1, np.int64)
    rec_p[record] = partition
    return watch.observe(list(zip(rec_p.tolist(), keys, strict=True)), record, x, continuous)


def flags(watch, *batch):
    """The watch's mask, all False where it says None."""
    got = observe(watch, *batch)
    return np.zeros(batch[3].shape, bool) if got is None else got


class Oracle:
    """One row at a time: per key the last row and each feature's count."""

    def __init__(self, records: int):
        self.records = records
        self.state: dict = {}

    def observe(self, partition, keys, record, x, continuous):
        out = np.zeros(x.shape, bool)
        for i in range(len(x)):
            k = (int(partition[i]), keys[record[i]])
            last, run = self.state.get(k, (None, None))
            if last is None:
                run = np.ones(x.shape[1], np.int64)
            else:
                run = np.where(x[i] == last, run + 1, 1)
            self.state[k] = (x[i].copy(), run)
            out[i] = (run >= self.records) & continuous
        return out


def batches(rng: np.random.Generator, d: int):
    """(partition, keys, record, rows) per batch: a few keys, each a home partition,
    some sensors stuck for a while, some records with several rows."""
    n_keys = int(rng.choice([1, 3, 12]))
    keys = [None, b"", b"\xff"] + [b"k%d" % i for i in range(n_keys)]
    keys = keys[:n_keys]
    home = {k: int(rng.integers(2)) for k in keys}
    cur = {k: rng.normal(size=d).astype(np.float32) for k in keys}
    stuck = {k: np.zeros(d, bool) for k in keys}
    for _ in range(int(rng.integers(5, 25))):
        recs, part, rec_of, rows = [], [], [], []
        for r in range(int(rng.integers(1, 40))):
            k = keys[int(rng.integers(len(keys)))]
            if rng.random() < 0.1:
                stuck[k] = rng.random(d) < 0.3
            for _ in range(int(rng.choice([1, 1, 1, 3]))):
                fresh = rng.normal(size=d).astype(np.float32)
                cur[k] = np.where(stuck[k], cur[k], fresh)
                rows.append(cur[k].copy())
                part.append(home[k])
                rec_of.append(r)
            recs.append(k)
        yield np.asarray(part), recs, np.asarray(rec_of), np.asarray(rows, np.float32)


@pytest.mark.parametrize("seed", range(30))
def test_the_watch_flags_what_a_row_by_row_count_flags(seed):
    """With room for every key, as the oracle; with 2 keys, the same flags when rolled
    back batches are read again."""
    rng = np.random.default_rng(seed)
    d = int(rng.choice([1, 4]))
    records = int(rng.choice([2, 3, 5]))
    continuous = rng.random(d) < 0.8
    max_keys = 100 if rng.random() < 0.5 else 2
    watch = RepeatWatch(records, max_keys=max_keys)
    oracle = Oracle(records)
    delivered = {}
    pending = []  # (batch, what the watch flagged in it)
    for b in batches(rng, d):
        got = flags(watch, *b, continuous)
        if max_keys >= 100:
            np.testing.assert_array_equal(got, oracle.observe(*b, continuous))
        pending.append((b, got))
        u = rng.random()
        if u < 0.15:  # a failed delivery: back to the last delivered batch, read again
            watch.rollback()
            oracle.state = {k: (v[0].copy(), v[1].copy()) for k, v in delivered.items()}
            for again, first in pending:
                got = flags(watch, *again, continuous)
                np.testing.assert_array_equal(got, first)  # evictions included
                if max_keys >= 100:
                    np.testing.assert_array_equal(got, oracle.observe(*again, continuous))
        if u < 0.5:
            watch.settled(len(watch._journals))
            pending = []
            delivered = {k: (v[0].copy(), v[1].copy()) for k, v in oracle.state.items()}
        assert len(watch) <= max_keys


def test_a_stuck_sensor_is_flagged_from_its_nth_equal_reading_until_it_moves():
    watch = RepeatWatch(3, max_keys=10)
    x = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0], [5.0, 6.0]], np.float32)
    part, keys, rec = np.zeros(5, np.int64), [b"m"] * 5, np.arange(5)
    got = flags(watch, part, keys, rec, x, np.array([True, True]))
    assert got[:, 1].tolist() == [False, False, True, True, False]
    assert not got[:, 0].any()
    # the count carries on across batches
    more = np.array([[6.0, 6.0], [7.0, 6.0]], np.float32)
    got = flags(watch, part[:2], keys[:2], rec[:2], more, np.array([True, True]))
    assert got[:, 1].tolist() == [False, True]


def test_features_that_repeat_in_normal_data_are_never_flagged():
    watch = RepeatWatch(2, max_keys=10)
    x = np.ones((6, 2), np.float32)
    got = flags(watch, np.zeros(6, np.int64), [b"m"] * 6, np.arange(6), x, np.array([False, True]))
    assert not got[:, 0].any() and got[1:, 1].all()


def test_keys_of_other_partitions_and_other_keys_do_not_share_a_count():
    watch = RepeatWatch(2, max_keys=10)
    x = np.ones((4, 1), np.float32)
    part = np.array([0, 1, 0, 1])
    got = flags(watch, part, [b"a", b"a", None, b""], np.arange(4), x, np.array([True]))
    assert not got.any()


def test_eviction_forgets_the_keys_seen_longest_ago():
    watch = RepeatWatch(2, max_keys=2)
    one = np.ones((1, 1), np.float32)
    z, r = np.zeros(1, np.int64), np.zeros(1, np.int64)
    for k in (b"a", b"b", b"c"):
        observe(watch, z, [k], r, one, np.array([True]))
    assert set(watch.slots) == {(0, b"b"), (0, b"c")}
    # b's count survived, a's did not
    assert flags(watch, z, [b"b"], r, one, np.array([True])).all()
    assert not flags(watch, z, [b"a"], r, one, np.array([True])).any()


def test_dropped_partitions_are_forgotten():
    watch = RepeatWatch(2, max_keys=10)
    one = np.ones((1, 1), np.float32)
    z, r = np.zeros(1, np.int64), np.zeros(1, np.int64)
    observe(watch, z, [b"a"], r, one, np.array([True]))
    watch.settled()
    watch.drop_partitions({0})
    assert len(watch) == 0
    assert not flags(watch, z, [b"a"], r, one, np.array([True])).any()


def test_a_model_of_another_width_starts_afresh():
    watch = RepeatWatch(2, max_keys=10)
    z, r = np.zeros(1, np.int64), np.zeros(1, np.int64)
    observe(watch, z, [b"a"], r, np.ones((1, 2), np.float32), np.array([True, True]))
    got = flags(watch, z, [b"a"], r, np.ones((1, 3), np.float32), np.array([True] * 3))
    assert not got.any()
    # both batches are still in flight: one journal each, and a rollback undoes both
    assert len(watch._journals) == 2
    watch.rollback()
    assert len(watch) == 0


def test_wide_rows_hold_fewer_keys_within_the_memory_budget():
    watch = RepeatWatch(2, max_keys=100_000)
    d = 4096
    x = np.zeros((3, d), np.float32)
    observe(watch, np.zeros(3, np.int64), [b"a", b"b", b"c"], np.arange(3), x, np.ones(d, bool))
    assert watch.cap == MEMORY_BYTES // (8 * d + 16) < 100_000
    assert watch._last.nbytes + watch._run.nbytes <= MEMORY_BYTES
