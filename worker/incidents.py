"""Per-entity incidents (docs/contract.md#incidents): scored rows in → incident messages
and changed per-key state out. Pure logic: nothing here talks to Kafka.

The tracker takes one batch at a time: it picks out the rows that can change anything
and hands them, in (partition, offset, row) order, to the per-key rule
(worker/incident_rule.py), sweeps what expired, and keeps each partition's progress
(the next offset to apply, its stream time). The messages are
worker/incident_messages.py's; the rows it reads, the state it keeps and the
changelog form: worker/incident_records.py.

Every batch's changes are journalled until the batch is delivered, so a failed
delivery rolls the tracker back to the last delivered batch (`rollback`).

Cost: a row changes something only if it is anomalous or its key holds state, so the
batch picks those rows out in numpy and C and looks at only them in Python; a run of
one key's normal rows (a multi-row record's vectors) is applied at once; where keys
interleave (a keyed stream round robin) and no sweep or eviction can act within a
partition's rows, each key's rows go together (`_by_key`) and what row order decides
is put back in it; what expired comes from a heap of deadlines
(worker/incident_expiry.py), not a scan of every key.
The result is the per-row path's, message for message and byte for byte
(tests/unit/test_incidents_fast.py keeps that path as the oracle).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from operator import itemgetter

import numpy as np

from worker.incident_messages import SCHEMA_HEADER, incident_message, severity
from worker.incident_records import (  # re-exported: the tracker's API
    Anomaly,
    Incident,
    KeyState,
    Observed,
    Rows,
    changelog_records,
    incident_schema,
    read_changelog,
    rows_of,
)
from worker.incident_rule import IncidentConfig, IncidentRule, open_count
from worker.repeats import RepeatWatch

__all__ = [
    "Anomaly",
    "Incident",
    "IncidentConfig",
    "IncidentTracker",
    "KeyState",
    "Observed",
    "Rows",
    "changelog_records",
    "incident_schema",
    "open_count",
    "read_changelog",
    "rows_of",
    "severity",
]


def record_keys(rows: Rows) -> list[tuple[int, bytes | None]]:
    """Per record: its (partition, key), partition -1 for a record without rows."""
    rec_p = np.full(len(rows.keys), -1, dtype=np.int64)
    rec_p[rows.record] = rows.partition
    return list(zip(rec_p.tolist(), rows.keys, strict=True))


@dataclass(slots=True)
class _Journal:
    """The state before one batch touched it: what `rollback` puts back."""

    states: dict = field(default_factory=dict)  # (p, key) → packed KeyState | None
    marks: dict = field(default_factory=dict)  # p → (applied, stream) | None
    queued: list = field(default_factory=list)  # re-announcements this batch carried


@dataclass(frozen=True, slots=True)
class _Cand:
    """One partition's candidate rows of a batch, in order: their index into the batch,
    offset, row, event time, flag and the partition's stream time at each."""

    idx: np.ndarray
    off: np.ndarray
    row: np.ndarray
    ts: np.ndarray
    flag: np.ndarray
    stream: np.ndarray

    def pos(self, k: int) -> tuple[int, int]:
        return int(self.off[k]), int(self.row[k])


class IncidentTracker(IncidentRule):
    """The per-key rule, fed one batch at a time, with each partition's progress and
    an undo journal of every batch not delivered yet."""

    by_key_records = 2  # records a key in a batch from which `_by_key` pays (tests: 0)

    def __init__(self, config: IncidentConfig):
        super().__init__(config)
        self.applied: dict[int, int] = {}  # partition → next offset not yet applied
        self.stream_ms: dict[int, int] = {}  # partition → largest event time seen
        self._journals: list[_Journal] = []  # undelivered batches, oldest first
        self._queued: list = []  # re-announcements for the next batch
        self._journal: _Journal | None = None
        # (partition, key) → its state as packed at the end of the last batch that changed
        # it: a state changes only in `observe`, and every state a batch touched is packed
        # for the changelog at its end, so this is what the journal keeps of it.
        self._packed: dict[tuple[int, bytes | None], bytes] = {}
        # stuck features (worker/repeats.py): journalled batch for batch with the above
        n = config.stuck_records
        self.repeats = RepeatWatch(n, config.max_keys) if n else None

    # -- one batch ----------------------------------------------------------------

    def observe(self, rows: Rows | None) -> Observed:
        """Apply one batch's rows, in (partition, offset, row) order. Every batch is
        observed, even one without valid rows: `settled` counts batches."""
        out = self._out = Observed()
        self._journal = _Journal(queued=self._queued)
        self._journals.append(self._journal)
        out.messages.extend(self._queued)
        self._queued = []
        if rows is not None and len(rows):
            keys = record_keys(rows)
            if self.repeats is not None:
                rows = self._with_stuck(rows, keys)
            self._apply(rows, keys)
        elif self.repeats is not None:
            self.repeats.observe_nothing()
        for p in sorted(out.applied):
            self._sweep(p, self.stream_ms[p])
        packed = self._packed
        for p, changed in out.changed.items():
            for key, state in changed.items():
                if state is None:
                    packed.pop((p, key), None)
                else:
                    changed[key] = packed[(p, key)] = state.pack()
        self._journal = self._out = None
        self._deadlines.prune(self.states)
        return out

    def _with_stuck(self, rows: Rows, keys: list) -> Rows:
        """The rows, with those that hold a stuck feature counted as anomalous."""
        watch = self.repeats
        if rows.continuous is None or not rows.continuous.any():
            watch.observe_nothing()
            return rows
        mask = watch.observe(keys, rows.record, rows.values, rows.continuous)
        if mask is None:
            return rows
        hit = np.flatnonzero(mask.any(axis=1))
        names = rows.feature_names
        stuck = {int(i): tuple(names[f] for f in np.flatnonzero(mask[i])) for i in hit}
        flags = rows.is_anomaly.copy()  # the batch's own flags go out as events
        flags[hit] = True
        return replace(rows, is_anomaly=flags, stuck=stuck)

    def _apply(self, rows: Rows, keys: list) -> None:
        out = self._out
        order = np.lexsort((rows.row, rows.offset, rows.partition))
        part = rows.partition[order]
        offs = rows.offset[order]
        ts = rows.ts[order]
        flags = rows.is_anomaly[order]
        # Only rows that are anomalous, or whose key has state, change anything: the
        # rows of a key that has state now or an anomalous row in this batch are the
        # candidates, decided per record in C; each is checked again when its turn comes.
        cand = flags | self._hot_records(rows, keys)[rows.record[order]]
        # a row read twice in one batch counts once (KeyState.pos): then row by row
        rws = rows.row[order]
        whole = not np.any((np.diff(offs) == 0) & (np.diff(rws) == 0) & (np.diff(part) == 0))
        bounds = np.flatnonzero(np.diff(part)) + 1
        for lo, hi in zip(
            np.concatenate(([0], bounds)), np.concatenate((bounds, [len(part)])), strict=True
        ):
            p = int(part[lo])
            start = self.applied.get(p, -1)
            fresh = lo + int(np.searchsorted(offs[lo:hi], start))  # offsets are sorted
            out.skipped += fresh - lo
            if fresh == hi:
                continue
            self._mark(p)
            stream0 = self.stream_ms.get(p, -(1 << 62))
            stream = np.maximum.accumulate(np.maximum(ts[fresh:hi], stream0))
            at = np.flatnonzero(cand[fresh:hi])
            if len(at):
                idx, now = order[fresh:hi][at], stream[at]
                if not (whole and self._by_key(p, rows, idx, now)):
                    self._rows(p, rows, idx, now, whole)
            self.stream_ms[p] = int(stream[-1])
            self.applied[p] = int(offs[hi - 1]) + 1
            out.applied[p] = (self.applied[p], self.stream_ms[p])

    def _hot_records(self, rows: Rows, sks: list) -> np.ndarray:
        """Per record: does its (partition, key) hold state, or have an anomalous row here?"""
        hot = np.zeros(len(sks), dtype=bool)
        anomalous = np.flatnonzero(rows.is_anomaly)
        if not self.states and not len(anomalous):
            return hot
        if self.states:
            hot |= np.fromiter(map(self.states.__contains__, sks), dtype=bool, count=len(sks))
        if len(anomalous):
            seen = {sks[r] for r in rows.record[anomalous].tolist()}
            hot |= np.fromiter(map(seen.__contains__, sks), dtype=bool, count=len(sks))
        return hot

    def _rows(self, p: int, rows: Rows, idx: np.ndarray, stream: np.ndarray, runs: bool) -> None:
        """The candidate rows idx of partition p, in order; stream: the partition's
        stream time at each. With `runs`, a run of rows of one key (the vectors of a
        multi-row record, say) goes to `_run`; else, and a row on its own, to `_row`."""
        keys, states = rows.keys, self.states
        rec = rows.record[idx]
        c = _Cand(idx, rows.offset[idx], rows.row[idx], rows.ts[idx], rows.is_anomaly[idx], stream)
        # runs: consecutive candidates of one key (a key's records may follow each other)
        starts = np.flatnonzero(np.diff(rec)) + 1 if runs else np.empty(0, np.int64)
        cuts = [
            at
            for at, r, q in zip(
                starts.tolist(), rec[starts].tolist(), rec[starts - 1].tolist(), strict=True
            )
            if keys[r] != keys[q]
        ]
        bounds = list(zip([0, *cuts], [*cuts, len(idx)], strict=True))
        single = [lo for lo, hi in bounds if hi - lo == 1] if runs else range(len(idx))
        if len(single):  # their values as Python objects, at once
            at = np.asarray(single, dtype=np.int64)
            one = iter(
                zip(
                    *(v[at].tolist() for v in (c.idx, c.off, c.row, c.ts, c.flag, c.stream)),
                    rec[at].tolist(),
                    strict=True,
                )
            )
        for lo, hi in bounds if runs else ((i, i + 1) for i in range(len(idx))):
            if hi - lo > 1:
                self._run(p, keys[int(rec[lo])], rows, c, lo, hi)
                continue
            i, off, row, t, anomalous, now, r = next(one)
            key = keys[r]
            if anomalous or (p, key) in states:
                if now >= self._due.get(p, -(1 << 62)):
                    self._sweep(p, now)
                self._row(p, key, rows, i, (off, row), t, anomalous)

    def _by_key(self, p: int, rows: Rows, idx: np.ndarray, stream: np.ndarray) -> bool:
        """The candidate rows idx of partition p (no row twice), key by key, where that
        does what row by row would: no sweep can act within them (every deadline, and
        every one their anomalies set, lies beyond their stream time) and no key is
        evicted, so one key's rows do not touch another's state. Interleaved keys' rows
        (a keyed stream round robin) then go in runs (`_run`), and what row order decides
        is put back in it: the messages, the changed keys, the journal and the eviction
        order. False, and nothing done, where it does not hold or may not pay (fewer
        than two records a key)."""
        due = self._due.get(p)
        # every key here holds state or has an anomalous row: pays from two records a key
        pays = self.by_key_records
        if due is None or pays * len(self.states) > min(len(idx), len(rows.keys)):
            return False
        rec = rows.record[idx]
        starts = np.flatnonzero(np.diff(rec, prepend=-1))  # records: their rows are adjacent
        flag = rows.is_anomaly[idx]
        if pays * (len(self.states) + int(np.count_nonzero(flag))) > len(starts):
            return False
        end, ts = int(stream[-1]), rows.ts[idx]
        if end >= due or (flag.any() and end >= int(ts[flag].min()) + self.config.quiet_ms):
            return False
        keys, states = rows.keys, self.states
        ids: dict = {}
        kid = np.fromiter(
            (ids.setdefault(keys[r], len(ids)) for r in rec[starts].tolist()), np.int64, len(starts)
        )
        kid = np.repeat(kid, np.diff(starts, append=len(rec)))
        new = {keys[r] for r in rec[flag].tolist()}
        if len(states) + sum((p, k) not in states for k in new) > self.config.max_keys:
            return False
        o = np.argsort(kid, kind="stable")
        c = _Cand(idx[o], rows.offset[idx[o]], rows.row[idx[o]], ts[o], flag[o], stream[o])
        cuts = (np.flatnonzero(np.diff(kid[o])) + 1).tolist()
        out, journal = self._out, self._journal.states
        n_messages, n_journal = len(out.messages), len(journal)
        evicted = set(out.changed.get(p, ()))  # by an earlier partition's new keys
        first, last, tags = {}, {}, []  # key → position of its first change, last row
        for lo, hi in zip([0, *cuts], [*cuts, len(o)], strict=True):
            key = keys[int(rec[o[lo]])]
            state = states.get((p, key))
            for k in range(lo, hi):
                if (c.pos(k) > state.pos) if state is not None else c.flag[k]:
                    first[key] = c.pos(k)
                    break
            last[key] = c.pos(hi - 1)
            self._run(p, key, rows, c, lo, hi, tags)
        # what row order decides: a key first changed (and journalled) at its first row
        # that acted, and it moves to the end of the eviction order at its last
        changed = out.changed.get(p, {})
        fresh = sorted((k for k in changed if k not in evicted), key=first.__getitem__)
        if fresh:
            kept = [k for k in changed if k in evicted]
            out.changed[p] = {k: changed[k] for k in (*kept, *fresh)}
            held = list(journal.items())
            self._journal.states = dict(held[:n_journal])
            self._journal.states.update(((p, k), journal[(p, k)]) for k in fresh)
        for k in sorted((k for k in first if (p, k) in states), key=last.__getitem__):
            sk = (p, k)
            states[sk] = state = states.pop(sk)
            self._placed(sk, state)
        if len(tags) > 1:
            sent = out.messages[n_messages:]
            pairs = sorted(zip(tags, sent, strict=True), key=itemgetter(0))
            out.messages[n_messages:] = [m for _, m in pairs]
        return True

    def _run(
        self, p: int, key, rows: Rows, c: _Cand, lo: int, hi: int, tags: list | None = None
    ) -> None:
        """Candidate rows lo .. hi - 1, all of one key. Its normal rows between two
        anomalous ones change the key's state all in the same way, so a stretch of them
        is applied at once when no sweep could act within it; the rest goes row by row.
        With `tags` (from `_by_key`, where no sweep acts), each message sent gets its
        row's position there."""
        sk = (p, key)
        out = self._out
        anomalous_at = (lo + np.flatnonzero(c.flag[lo:hi])).tolist()
        k, a = lo, 0
        while k < hi:
            while a < len(anomalous_at) and anomalous_at[a] < k:
                a += 1
            m = anomalous_at[a] if a < len(anomalous_at) else hi  # the stretch: k .. m - 1
            pos = c.pos(k)
            state = self.states.get(sk)
            if (
                m - k > 1
                and state is not None
                and pos > state.pos
                # every sweep of the stretch returns at once: _due is a lower bound of
                # every deadline on p (this key's too), and the stretch moves none earlier
                and (tags is not None or int(c.stream[m - 1]) < self._due.get(p, -(1 << 62)))
            ):
                q = self._stretch(p, key, state, c.pos(m - 1), c.ts[k:m])
                if tags is not None and q is not None:
                    tags.append(c.pos(k + q))
                k = m
                continue
            anomalous = k == m
            if state is None and not anomalous:
                k = m  # the key holds nothing: its normal rows up to the next anomaly are no-ops
                continue
            if tags is None:
                self._sweep(p, int(c.stream[k]))
                self._row(p, key, rows, int(c.idx[k]), pos, int(c.ts[k]), anomalous)
            else:
                sent = len(out.messages)
                self._row(p, key, rows, int(c.idx[k]), pos, int(c.ts[k]), anomalous)
                tags.extend([pos] * (len(out.messages) - sent))
            k += 1

    # -- journal -------------------------------------------------------------------

    def _touch(self, sk) -> None:
        """Journal a key's state before this batch first changes it."""
        journal = self._journal.states
        if sk not in journal:
            state = self.states.get(sk)
            if state is not None:
                state = self._packed.get(sk) or state.pack()
            journal[sk] = state

    def _mark(self, p: int) -> None:
        if p not in self._journal.marks:
            self._journal.marks[p] = (
                (self.applied[p], self.stream_ms[p]) if p in self.applied else None
            )

    def settled(self, batches: int = 1) -> None:
        """The oldest `batches` observed batches were delivered: forget their journals."""
        del self._journals[:batches]
        if self.repeats is not None:
            self.repeats.settled(batches)

    def pending_batches(self) -> int:
        return len(self._journals)

    def rollback(self) -> None:
        """Undo every batch not delivered yet, newest first: back to the last delivered one."""
        self._due.clear()
        self._packed.clear()
        self._queued = [m for j in self._journals for m in j.queued] + self._queued
        for j in reversed(self._journals):
            for sk, old in j.states.items():
                self.states.pop(sk, None)
                if old is not None:
                    self.states[sk] = KeyState.unpack(old)
            for p, mark in j.marks.items():
                if mark is None:
                    self.applied.pop(p, None)
                    self.stream_ms.pop(p, None)
                else:
                    self.applied[p], self.stream_ms[p] = mark
        self._journals.clear()
        if self.repeats is not None:
            self.repeats.rollback()
        self._deadlines.rebuild(self.states, self._deadline)
        self._open_now = None

    # -- partitions ------------------------------------------------------------------

    def partitions(self) -> set[int]:
        """Partitions the tracker holds anything of."""
        return {p for p, _ in self.states} | set(self.applied)

    def drop_partitions(self, partitions) -> None:
        """Forget the state of partitions this worker no longer holds."""
        gone = set(partitions)
        for sk in [sk for sk in self.states if sk[0] in gone]:
            del self.states[sk]
            self._packed.pop(sk, None)
        self._deadlines.drop(gone)
        if self.repeats is not None:
            self.repeats.drop_partitions(gone)
        self._open_now = None
        for p in gone:
            self._due.pop(p, None)
            self.applied.pop(p, None)
            self.stream_ms.pop(p, None)

    def restore(
        self,
        p: int,
        states: dict,
        applied: int | None,
        stream_ms: int | None,
        reannounce: bool = False,
    ) -> int:
        """Load partition p's state, as read back from the changelog. With `reannounce`,
        the next batch carries each open incident's current message and each kept
        resolve message once more (same id and sequence). Returns the incidents queued."""
        queued = 0
        for key, raw in states.items():
            moved = (p, key) not in self.states  # an existing key keeps its place
            state = self.states[(p, key)] = KeyState.unpack(raw)
            self._packed.pop((p, key), None)
            self._placed((p, key), state, moved)
            if not reannounce:
                continue
            if state.incident is not None:
                inc = state.incident
                value = incident_message(
                    self.config.topic, key, inc, "open", None, max(0, inc.seq - 1)
                )
                self._queued.append((key, value, [("schema", SCHEMA_HEADER)]))
                queued += 1
            if state.closed is not None:
                self._queued.append((key, state.closed.encode(), [("schema", SCHEMA_HEADER)]))
                queued += 1
        self._due.pop(p, None)
        self._open_now = None
        if applied is not None:
            self.applied[p] = applied
            self.stream_ms[p] = stream_ms
        return queued
