"""The incident tracker's batch-wise fast path against its simple per-row oracle
(tests/unit/incidents_reference.py): random keyed streams, single- and multi-row
records, rows handed over in any order, event time that jumps and goes back, tight
and default settings, and a worker's life around them (deliveries, failed deliveries
rolled back and read again, restarts restored from the changelog, with and without a
lost marker, and re-announced). After every step both trackers must have sent the same
messages and changelog records, counted the same and hold the same state in the same
(eviction) order."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from tests.unit.incidents_reference import ReferenceTracker
from worker.incidents import (
    IncidentConfig,
    IncidentTracker,
    Rows,
    changelog_records,
    read_changelog,
)

T0 = 1_764_253_000_000
SEEDS = 40  # random streams, each a few hundred records


class Rec:
    def __init__(self, key, value):
        self.key, self.value = key, value


def make_stream(rng: np.random.Generator) -> tuple[IncidentConfig, list[list[tuple]]]:
    """A config and batches of records (partition, offset, key, ts, [(flag, score, p)...])."""
    config = IncidentConfig(
        topic="features",
        window=int(rng.choice([1, 3, 5, 20])),
        open_share=float(rng.choice([0.25, 0.5, 1.0])),
        update_ms=int(rng.choice([0, 40, 1_000])),
        quiet_ms=int(rng.choice([1, 60, 150, 2_000, 60_000])),
        max_keys=int(rng.choice([1, 3, 8, 100_000])),
    )
    n_keys = int(rng.choice([1, 3, 8, 40]))
    keys = [None, b"", b"\x00\xff"] + [b"k%d" % i for i in range(n_keys)]
    keys = keys[: max(1, n_keys)]
    partitions = int(rng.choice([1, 2, 3]))
    home = {k: int(rng.integers(partitions)) for k in keys}
    multi = rng.random() < 0.5  # some records carry several rows
    rate = {k: float(rng.choice([0.0, 0.0, 0.01, 0.1, 0.5, 0.95])) for k in keys}
    offsets = [0] * partitions
    t = T0
    records = []
    for _ in range(int(rng.integers(100, 400))):
        if rng.random() < 0.03:  # episodes start and end
            rate[keys[int(rng.integers(len(keys)))]] = float(rng.choice([0.0, 0.01, 0.5, 1.0]))
        key = keys[int(rng.integers(len(keys)))]
        p = home[key] if rng.random() < 0.9 else int(rng.integers(partitions))
        jump = rng.random()
        if jump < 0.7:
            t += int(rng.integers(0, 30))
        else:
            t += int(rng.integers(0, 400)) if jump < 0.93 else int(rng.integers(-500, 5_000))
        n_rows = int(rng.integers(1, 40)) if multi and rng.random() < 0.5 else 0
        rows = [
            (
                bool(rng.random() < rate[key]),
                float(np.round(rng.random() * 4, 1)),  # ties happen
                float(rng.choice([1e-9, 1e-6, 1e-4, 0.01, 0.5])),
            )
            for _ in range(max(1, n_rows))
        ]
        records.append((p, offsets[p], key, t, rows, n_rows > 0))
        offsets[p] += 1
    batches, i = [], 0
    while i < len(records):
        n = int(rng.choice([1, 2, 7, 30, 100]))
        batches.append(records[i : i + n])
        i += n
    return config, batches


def to_rows(batch: list[tuple], rng: np.random.Generator, empty: float = 0.03) -> Rows | None:
    spec = []
    for r, (p, off, _key, ts, rows, multi) in enumerate(batch):
        for j, (flag, score, pv) in enumerate(rows):
            spec.append((p, off, j if multi else -1, ts, flag, score, pv, r))
    if not spec or rng.random() < empty:
        return None  # a batch without valid rows
    order = rng.permutation(len(spec)) if rng.random() < 0.5 else np.arange(len(spec))
    spec = [spec[i] for i in order]
    col = list(zip(*spec, strict=True))
    return Rows(
        partition=np.array(col[0], dtype=np.int64),
        offset=np.array(col[1], dtype=np.int64),
        row=np.array(col[2], dtype=np.int64),
        ts=np.array(col[3], dtype=np.int64),
        is_anomaly=np.array(col[4], dtype=bool),
        score=np.array(col[5], dtype=np.float32),
        p_value=np.array(col[6], dtype=np.float32),
        record=np.array(col[7], dtype=np.int64),
        keys=[b[2] for b in batch],
        top=lambda i: [["f0", float(spec[i][1]), 0.0, spec[i][5]]],
        version="v1",
    )


def same(fast: IncidentTracker, ref: ReferenceTracker) -> None:
    assert [(sk, s.pack()) for sk, s in fast.states.items()] == [
        (sk, s.pack()) for sk, s in ref.states.items()
    ]
    assert fast.applied == ref.applied and fast.stream_ms == ref.stream_ms
    assert fast.open_incidents() == ref.open_incidents()
    assert fast.partitions() == ref.partitions()
    assert fast.pending_batches() == ref.pending_batches()


def same_out(a, b) -> None:
    assert a.messages == b.messages
    assert [(p, list(c.items())) for p, c in a.changed.items()] == [
        (p, list(c.items())) for p, c in b.changed.items()
    ]
    assert list(a.applied.items()) == list(b.applied.items())
    assert (a.opened, a.resolved, a.evicted, a.skipped) == (
        b.opened,
        b.resolved,
        b.evicted,
        b.skipped,
    )


def restart(config, delivered: list, rng, lose_marker: bool, reannounce: bool):
    """Both trackers again, from the changelog of the delivered batches."""
    by_p: dict = {}
    for k, out in enumerate(delivered):
        for p, key, value in changelog_records(out):
            if lose_marker and key == b"m" and k == len(delivered) - 1:
                continue  # a crash between the key states and the marker
            by_p.setdefault(p, []).append(Rec(key, value))
    trackers = IncidentTracker(config), ReferenceTracker(config)
    queued = []
    for p in sorted(by_p, key=lambda _: rng.random()):
        read = read_changelog(by_p[p])
        queued.append([t.restore(p, *read, reannounce=reannounce) for t in trackers])
    assert all(a == b for a, b in queued)
    return trackers


@pytest.mark.parametrize("seed", range(SEEDS))
def test_the_fast_path_does_what_the_per_row_path_does(seed):
    run_both(seed)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_key_by_key_wherever_it_holds_does_what_the_per_row_path_does(seed, monkeypatch):
    """The same streams, with interleaved keys' rows applied key by key wherever that
    holds, not only where it pays (`IncidentTracker._by_key`)."""
    monkeypatch.setattr(IncidentTracker, "by_key_records", 0)
    run_both(seed)


def run_both(seed: int) -> None:
    rng = np.random.default_rng(seed)
    config, batches = make_stream(rng)
    fast, ref = IncidentTracker(config), ReferenceTracker(config)
    delivered: list = []  # outputs of delivered batches, in order (the changelog)
    unsettled: list = []
    i = done = 0  # next batch to read; batches delivered
    steps = 0
    while i < len(batches) and steps < 4 * len(batches):
        steps += 1
        rows = to_rows(batches[i], rng)
        a, b = fast.observe(rows), ref.observe(rows)
        same_out(a, b)
        same(fast, ref)
        unsettled.append(a)
        i += 1
        action = rng.random()
        if action < 0.55 or len(unsettled) > 4:
            n = int(rng.integers(1, len(unsettled) + 1))
            fast.settled(n), ref.settled(n)
            delivered += unsettled[:n]
            unsettled = unsettled[n:]
            done += n
        elif action < 0.7:  # a failed delivery: back to the last delivered batch, read again
            fast.rollback(), ref.rollback()
            unsettled, i = [], done
        elif action < 0.78:  # a restart: restore, then read again from a little earlier
            fast, ref = restart(
                config, delivered, rng, rng.random() < 0.5, bool(rng.random() < 0.5)
            )
            unsettled, i = [], max(0, done - int(rng.integers(0, 3)))
            done = i
            delivered = delivered[:done]
        same(fast, ref)
    assert i == len(batches) or steps == 4 * len(batches)


def test_the_random_streams_reach_every_branch():
    """The streams above open, update, resolve, evict and skip rows read again (else
    the comparison would prove little)."""
    totals = dict.fromkeys(("opened", "resolved", "evicted", "skipped", "messages"), 0)
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        config, batches = make_stream(rng)
        tracker = IncidentTracker(config)
        for batch in batches:
            out = tracker.observe(to_rows(batch, rng))
            for name in ("opened", "resolved", "evicted", "skipped"):
                totals[name] += getattr(out, name)
            totals["messages"] += len(out.messages)
            tracker.settled()
        out = tracker.observe(to_rows(batches[-1], rng))  # read again: skipped
        totals["skipped"] += out.skipped
    assert all(v > 0 for v in totals.values()), totals


def compare(config: IncidentConfig, batches: list[list[tuple]]) -> list:
    """Both trackers through batches of (partition, offset, key, ts, flags of its rows,
    multi-row?) records; the messages sent."""
    rng = np.random.default_rng(0)
    fast, ref = IncidentTracker(config), ReferenceTracker(config)
    sent = []
    for batch in batches:
        rows = to_rows(
            [(p, o, k, t, [(f, 1.0 + o, 1e-6) for f in fl], m) for p, o, k, t, fl, m in batch],
            rng,
            empty=0.0,
        )
        a, b = fast.observe(rows), ref.observe(rows)
        same_out(a, b)
        same(fast, ref)
        fast.settled(), ref.settled()
        sent += a.messages
    return sent


EDGE = IncidentConfig(topic="t", window=5, open_share=0.4, update_ms=100, quiet_ms=100)


def test_a_sweep_due_where_a_run_of_normal_rows_starts():
    """Keys a and b hold anomalies; b's next record, all normal rows, comes when a (or
    both) are quiet long enough: they expire before b's rows, not after."""
    compare(
        EDGE,
        [
            [(0, 0, b"a", 0, [True], False), (0, 1, b"b", 150, [True], False)],
            [(0, 2, b"b", 200, [False] * 4, True)],
        ],
    )
    compare(
        EDGE,
        [
            [(0, 0, b"a", 0, [True], False), (0, 1, b"b", 0, [True], False)],
            [(0, 2, b"b", 200, [False] * 4, True)],
        ],
    )


def test_a_sweep_due_inside_a_run_of_one_keys_records():
    batches = [
        [(0, 0, b"a", 0, [True], False), (0, 1, b"b", 50, [True], False)],
        [(0, 2 + i, b"b", 60 + 30 * i, [False], False) for i in range(6)],
    ]
    compare(EDGE, batches)


def test_an_update_due_inside_a_run_and_the_window_emptied_inside_a_run():
    opened = [(0, i, b"a", 10 * i, [True], False) for i in range(3)]
    run = [(0, 3 + i, b"a", 30 + 40 * i, [False], False) for i in range(8)]
    sent = compare(
        IncidentConfig(topic="t", window=5, open_share=0.4, update_ms=100, quiet_ms=10**6),
        [opened, run],
    )
    assert len(sent) == 2  # opened, then one update inside the run
    # a window that empties in the middle of a multi-row record: the key is forgotten
    compare(EDGE, [[(0, 0, b"a", 0, [True], False)], [(0, 1, b"a", 10, [False] * 9, True)]])
    compare(EDGE, [[(0, 0, b"a", 0, [True], False)], [(0, 1, b"a", 10, [False] * 5, True)]])
    # ... unless it keeps a resolved incident's message (then it stays)
    compare(
        EDGE,
        [
            [(0, i, b"a", i, [True], False) for i in range(3)],
            [(0, 3, b"x", 150, [False], False)],
            [(0, 4, b"a", 160, [False] * 9, True)],
        ],
    )


def test_a_row_twice_in_one_batch_counts_once():
    record = (0, 5, b"a", 10, [False] * 4, True)
    compare(EDGE, [[(0, 4, b"a", 0, [True], False)], [record, record]])


def test_rows_of_a_run_already_in_the_key_state_are_skipped():
    """A crash between a batch's key states and its marker: the restored marker is
    older than the key's state, and a multi-row record is read again."""
    first = [(0, 0, b"a", 0, [True, False, True], True)]
    second = [
        (0, 1, b"a", 5, [False, False, True, False], True),
        (0, 2, b"a", 6, [False] * 3, True),
    ]
    rng = np.random.default_rng(0)
    rows = [
        to_rows(b, rng, empty=0.0)
        for b in (
            [(*r[:4], [(f, 2.0, 1e-6) for f in r[4]], r[5]) for r in b] for b in (first, second)
        )
    ]
    config = IncidentConfig(topic="t", window=5, open_share=1.0, quiet_ms=10**6)
    writer = IncidentTracker(config)
    outs = [writer.observe(r) for r in rows]
    recs = [Rec(k, v) for _, k, v in changelog_records(outs[0])]
    recs += [Rec(k, v) for _, k, v in changelog_records(outs[1]) if k != b"m"]  # marker lost
    fast, ref = IncidentTracker(config), ReferenceTracker(config)
    for t in (fast, ref):
        t.restore(0, *read_changelog(recs))
    a, b = fast.observe(rows[1]), ref.observe(rows[1])
    same_out(a, b)
    same(fast, ref)
    assert a.skipped == 7 and a.changed == {}


def test_a_restore_over_held_keys_keeps_their_order():
    """Restoring a partition's key that the tracker already holds leaves it where it
    is in the eviction (and expiry) order."""
    config = IncidentConfig(topic="t", window=5, open_share=0.4, quiet_ms=100)
    rng = np.random.default_rng(0)

    def batch(*records):
        spec = [(0, o, k, t, [(f, 2.0, 1e-6)], False) for o, k, t, f in records]
        return to_rows(spec, rng, empty=0.0)

    fast, ref = IncidentTracker(config), ReferenceTracker(config)
    first = batch((0, b"a", 0, True), (1, b"b", 0, True))
    outs = [t.observe(first) for t in (fast, ref)]
    a_state = outs[0].changed[0][b"a"]
    for t in (fast, ref):
        t.settled()
        t.restore(0, {b"a": a_state}, 2, 0)
    same(fast, ref)
    later = batch((2, b"c", 500, False))  # both a and b expire here, a first
    a, b = fast.observe(later), ref.observe(later)
    same_out(a, b)
    assert list(a.changed[0]) == [b"a", b"b"]


class CountsByKey:
    """Counts the batches `IncidentTracker._by_key` took (it returns True for them)."""

    def __init__(self, monkeypatch):
        self.taken = 0
        original = IncidentTracker._by_key

        def by_key(tracker, *args):
            took = original(tracker, *args)
            self.taken += took
            return took

        monkeypatch.setattr(IncidentTracker, "_by_key", by_key)


def test_interleaved_keys_go_key_by_key_and_expire_in_row_order(monkeypatch):
    """Keys a and b interleave (b first, a's rows last but one): applied key by key, a
    ends before b in the eviction order, and when both go quiet a resolves first."""
    counts = CountsByKey(monkeypatch)
    opened = [(0, i, k, i, [True], False) for i, k in enumerate([b"a", b"a", b"b", b"b"])]
    interleaved = [(0, 4 + i, k, 10 + i, [False], False) for i, k in enumerate(b"baab")]
    interleaved = [(p, o, bytes([k]), t, f, m) for p, o, k, t, f, m in interleaved]
    quiet = [(0, 8, b"x", 500, [False], False)]
    sent = compare(EDGE, [opened, interleaved, quiet])
    assert counts.taken == 1
    resolved = [orjson.loads(v) for k, v, _ in sent if orjson.loads(v)["status"] == "resolved"]
    assert [r["key"] for r in resolved] == ["a", "b"]


def test_rows_read_again_then_a_rollback_key_by_key(monkeypatch):
    """After a restart whose last marker was lost, key a's first rows of a batch were
    already applied (skipped) and b's were not: b changes first, so a failed delivery
    puts b back before a, as row by row."""
    counts = CountsByKey(monkeypatch)
    config = IncidentConfig(topic="t", window=5, open_share=1.0, quiet_ms=10**6)
    rng = np.random.default_rng(0)

    def rows(*records):
        spec = [(0, o, k, o, [(f, 2.0, 1e-6)], False) for o, k, f in records]
        return to_rows(spec, rng, empty=0.0)

    writer = IncidentTracker(config)
    outs = [
        writer.observe(rows((0, b"a", True), (1, b"b", True))),
        writer.observe(rows((2, b"a", False), (3, b"a", True))),
    ]
    recs = [Rec(k, v) for _, k, v in changelog_records(outs[0])]
    recs += [Rec(k, v) for _, k, v in changelog_records(outs[1]) if k != b"m"]  # marker lost
    fast, ref = IncidentTracker(config), ReferenceTracker(config)
    replay = [
        rows((2, b"a", False)),
        rows((3, b"a", True), *((o, b"ba"[o % 2 : o % 2 + 1], False) for o in range(4, 10))),
    ]
    for t in (fast, ref):
        t.restore(0, *read_changelog(recs))
    for batch in replay:
        a, b = fast.observe(batch), ref.observe(batch)
        same_out(a, b)
        same(fast, ref)
        if batch is replay[0]:
            fast.settled(), ref.settled()
    assert counts.taken == 1 and a.skipped == 1
    fast.rollback(), ref.rollback()
    same(fast, ref)
    assert list(fast.states) == [(0, b"b"), (0, b"a")]
