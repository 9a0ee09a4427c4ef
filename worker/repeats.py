"""Stuck features: a continuous feature that holds exactly the same value for
`records` consecutive rows of one key (docs/contract.md#stuck-features).

A score looks at one row. A sensor that stops updating while the others move gives
rows that are each plausible (its last reading was), so no row-level score sees it;
what gives it away is time: a reading that never repeats in normal data repeats. The
trainer marks the features for which exact repeats are evidence
(`Manifest.continuous`, training/fit.py `continuous_features`); the incident tracker
(worker/incidents.py) asks this watch, batch by batch, which rows hold such a feature
repeated for at least `records` rows of their key, and counts those rows as anomalous
rows of the key.

State: per (partition, key), the last row and how many rows in a row each feature
has held its value; arrays indexed by a slot per key, so a batch is a few numpy
operations whatever its number of keys. It is journalled per batch like the
tracker's (a failed delivery rolls both back to the last delivered batch), dropped
with a partition, and not written to the changelog: after a restart or a rebalance a
key's count starts again from the rows read again (found at most `records` − 1 rows
later).
At most `max_keys` keys are watched, and no more than MEMORY_BYTES hold (8 bytes per
feature and key); a new key evicts the keys seen longest ago.
Pure logic: nothing here talks to Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

RUN_CAP = 1 << 30  # a count that long stays there (int32)
MEMORY_BYTES = 64 << 20  # at most this much state: fewer keys for wide rows

Key = tuple[int, bytes | None]  # (partition, record key)


@dataclass(slots=True)
class _Undo:
    """What one batch changed: what `rollback` puts back."""

    # the slots it wrote at its end, and their rows, counts and ages before
    slots: np.ndarray | None = None
    last: np.ndarray | None = None
    run: np.ndarray | None = None
    seen: np.ndarray | None = None
    added: list[Key] = field(default_factory=list)  # keys it gave a slot
    # keys it took a slot from: (key, slot, row, count, age)
    evicted: list[tuple] = field(default_factory=list)


class RepeatWatch:
    def __init__(self, records: int, max_keys: int):
        if records < 2:
            raise ValueError("a repeat needs at least 2 records")
        self.records = records
        self.max_keys = max_keys
        self.cap = max_keys  # keys held at most, for the width of the rows (_reset)
        self.slots: dict[Key, int] = {}
        self._key_of: list[Key | None] = []  # slot → key
        self._free: list[int] = []
        self._last = np.empty((0, 0), np.float32)  # [slots, D]; NaN never repeats
        self._run = np.empty((0, 0), np.int32)
        self._seen = np.empty(0, np.int64)  # the batch that last saw the slot
        self._batch = 0
        self._journals: list[_Undo] = []

    def __len__(self) -> int:
        return len(self.slots)

    # -- one batch ------------------------------------------------------------------

    def observe(
        self, keys: list[Key], record: np.ndarray, x: np.ndarray, continuous: np.ndarray
    ) -> np.ndarray | None:
        """Rows [N, D] in each key's order, row i of record `record[i]`, whose
        (partition, key) is `keys[record[i]]`: for each row the mask [N, D] of its
        continuous features that have held their value for ≥ `records` rows of its
        key, or None when no row has one. Journalled until `settled`."""
        self._batch += 1
        n, d = x.shape
        if self._last.shape[1] != d:  # first batch, or a model of another width
            self._reset(d)
        undo = _Undo()
        self._journals.append(undo)
        if n == 0:
            return None
        rec_slot = self._slots_of(keys, undo)
        slot = rec_slot[record]
        tracked = np.flatnonzero(slot >= 0)
        order = tracked[np.argsort(slot[tracked], kind="stable")]
        s = slot[order]
        xs = x[order]
        start = np.ones(len(s), bool)
        start[1:] = s[1:] != s[:-1]
        end = np.ones(len(s), bool)
        end[:-1] = start[1:]
        prev = np.empty_like(xs)
        prev[1:] = xs[:-1]
        prev[start] = self._last[s[start]]
        eq = xs == prev
        # only a continuous feature that repeats somewhere in the batch needs counting
        # (in normal traffic none does); every other count is 1 at the key's last row
        cols = np.flatnonzero(eq.any(axis=0) & continuous)
        u = s[end]
        undo.slots, undo.last, undo.run, undo.seen = (
            u,
            self._last[u],
            self._run[u],
            self._seen[u],
        )
        self._last[u] = xs[end]
        stored = self._run[s[:, None], cols] if len(cols) else None
        self._run[u] = 1
        self._seen[u] = self._batch
        if not len(cols):
            return None
        run = self._counts(eq[:, cols], start, stored)
        self._run[u[:, None], cols] = np.minimum(run[end], RUN_CAP)
        hit = run >= self.records
        if not hit.any():
            return None
        stuck = np.zeros((n, d), bool)
        stuck[order[:, None], cols] = hit
        return stuck

    @staticmethod
    def _counts(eq: np.ndarray, start: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """Each row's count [M, C] (rows grouped by key, in order; `start`: a key's
        first row; `stored`: the key's count before the batch, at each row): rows since
        the last one that changed, or since the key's first row in the batch, which
        carries on from the stored count."""
        base = np.ones(eq.shape, np.int64)
        first_eq = start[:, None] & eq
        base[first_eq] = stored[first_eq] + 1
        idx = np.arange(len(eq))[:, None]
        anchor = np.maximum.accumulate(np.where(~eq | start[:, None], idx, 0), axis=0)
        return np.take_along_axis(base, anchor, axis=0) + (idx - anchor)

    def _slots_of(self, keys: list[Key], undo: _Undo) -> np.ndarray:
        """Per record: its key's slot, a new one for a new key, -1 where none is free
        (or the record has no rows: partition -1)."""
        found = self.slots
        rec_slot = np.fromiter(map(found.get, keys, repeat(-1)), np.int64, len(keys))
        for i in np.flatnonzero(rec_slot < 0).tolist():
            k = keys[i]
            if k[0] < 0:
                continue
            got = found.get(k)  # a key twice in the batch
            if got is None:
                got = self._take(undo)
                if got < 0:
                    continue
                found[k] = got
                self._key_of[got] = k
                undo.added.append(k)
                self._last[got] = np.nan
                self._run[got] = 0
            rec_slot[i] = got
        return rec_slot

    def _take(self, undo: _Undo) -> int:
        """A free slot: grow, or evict the keys seen longest ago (not this batch's)."""
        if not self._free:
            cap = len(self._key_of)
            if cap < self.cap:
                self._grow(min(self.cap, max(64, 2 * cap)))
            else:
                self._evict(undo)
        return self._free.pop() if self._free else -1

    def _evict(self, undo: _Undo) -> None:
        old = np.flatnonzero(self._seen < self._batch)
        if not len(old):
            return
        n = min(len(old), max(1, self.cap // 8))
        gone = old[np.argpartition(self._seen[old], n - 1)[:n]] if n < len(old) else old
        for slot in gone.tolist():
            k = self._key_of[slot]
            if k is None:
                continue
            del self.slots[k]
            self._key_of[slot] = None
            row = (self._last[slot].copy(), self._run[slot].copy(), self._seen[slot])
            undo.evicted.append((k, slot, *row))
            self._free.append(slot)

    def _grow(self, cap: int) -> None:
        old = len(self._key_of)
        d = self._last.shape[1]
        self._last = np.concatenate([self._last, np.full((cap - old, d), np.nan, np.float32)])
        self._run = np.concatenate([self._run, np.zeros((cap - old, d), np.int32)])
        self._seen = np.concatenate([self._seen, np.zeros(cap - old, np.int64)])
        self._key_of += [None] * (cap - old)
        self._free += range(cap - 1, old - 1, -1)

    def _reset(self, d: int) -> None:
        self.cap = max(1, min(self.max_keys, MEMORY_BYTES // (8 * d + 16)))
        self.slots.clear()
        self._key_of, self._free = [], []
        self._last = np.empty((0, d), np.float32)
        self._run = np.empty((0, d), np.int32)
        self._seen = np.empty(0, np.int64)
        # the batches in flight keep a journal each (settled counts them), now empty
        self._journals = [_Undo() for _ in self._journals]

    def observe_nothing(self) -> None:
        """A batch with no rows to watch: journalled all the same (one per batch)."""
        self._batch += 1
        self._journals.append(_Undo())

    # -- journal ----------------------------------------------------------------------

    def settled(self, batches: int = 1) -> None:
        del self._journals[:batches]

    def rollback(self) -> None:
        """Undo every batch not delivered yet, newest first. Keys dropped with their
        partition since stay dropped."""
        for j in reversed(self._journals):
            if j.slots is not None:
                mine = np.asarray([self._key_of[s] is not None for s in j.slots.tolist()], bool)
                u = j.slots[mine]
                self._last[u], self._run[u], self._seen[u] = j.last[mine], j.run[mine], j.seen[mine]
            for k in reversed(j.added):
                slot = self.slots.pop(k, None)
                if slot is not None:
                    self._key_of[slot] = None
                    self._free.append(slot)
            for k, slot, last, run, seen in j.evicted:
                if self._key_of[slot] is not None:  # taken since by a key not rolled back
                    continue
                self._free.remove(slot)
                self.slots[k] = slot
                self._key_of[slot] = k
                self._last[slot], self._run[slot], self._seen[slot] = last, run, seen
        self._journals.clear()

    def drop_partitions(self, partitions) -> None:
        gone = set(partitions)
        for k in [k for k in self.slots if k[0] in gone]:
            slot = self.slots.pop(k)
            self._key_of[slot] = None
            self._free.append(slot)
