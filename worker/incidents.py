"""Per-entity incidents (docs/contract.md#incidents): scored rows in → incident messages
and changed per-key state out. Pure logic: nothing here talks to Kafka.

The entity is the input record's Kafka key (bytes; None and b"" are entities of
their own); its state lives with the input partition the row came from. Time is
**event time** (the record's `ts`, else its Kafka timestamp), so a replayed
backlog yields the same incidents as the live stream:

* a key's **window** is its last `window` rows (a bitmask, bit 0 = newest); history
  the tracker does not hold counts as normal, so a key with no anomaly in its window
  and no open incident has no state at all;
* an incident **opens** at the row that makes ≥ `open_count` of the window anomalous;
  its id is a hash of that row's (topic, partition, offset, row) and the key;
* while open, an **update** goes out at most every `update_ms` of the key's event
  time, only when something changed;
* it **resolves** once the partition's stream time (the largest event time seen on
  that input partition) is `quiet_ms` past the key's last anomalous row, so a key
  that goes silent still resolves; anomalies of a key without an incident expire
  the same way;
* at most `max_keys` keys hold state; a new one evicts the key touched longest ago
  in input order (an open incident there resolves with `resolution: "evicted"`).

Every batch's changes are journalled until the batch is delivered, so a failed
delivery rolls the tracker back to the last delivered batch (`rollback`). The rows it
reads, the state it keeps and the changelog form: worker/incident_records.py.

Cost: a row changes something only if it is anomalous or its key holds state, so the
batch picks those rows out in numpy and C and looks at only them in Python; a run of
one key's normal rows (a multi-row record's vectors) is applied at once; what expired
comes from a heap of deadlines (worker/incident_expiry.py), not a scan of every key.
The result is the per-row path's, message for message and byte for byte
(tests/unit/test_incidents_fast.py keeps that path as the oracle).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import orjson

from worker.incident_expiry import Deadlines
from worker.incident_records import (  # re-exported: the tracker's API
    Anomaly,
    Incident,
    KeyState,
    Observed,
    Rows,
    Src,
    changelog_records,
    incident_schema,
    read_changelog,
    rows_of,
)

SCHEMA_VERSION = 1
SCHEMA_HEADER = b"cae-stream.incident.v1"
KIND = "anomaly"
# Severity bands from the p-value of the incident's strongest row (upper bounds, inclusive).
SEVERITY_BANDS = ((1e-7, "critical"), (1e-5, "high"), (1e-3, "medium"), (1.0, "low"))

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
    "read_changelog",
    "rows_of",
    "severity",
]


def severity(p_value: float) -> str:
    for bound, name in SEVERITY_BANDS:
        if p_value <= bound:
            return name
    return "low"


def open_count(window: int, share: float) -> int:
    """Anomalous rows of the window that open an incident: ⌈share · window⌉, at least 1."""
    return max(1, math.ceil(share * window - 1e-9))


def incident_id(topic: str, src: Src, key: bytes | None) -> str:
    """Deterministic from the input: the opening row's position and the key."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{topic}\0{src[0]}\0{src[1]}\0{src[2]}\0".encode())
    h.update(b"\0" if key is None else b"\1" + key)
    return h.hexdigest()


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


@dataclass(frozen=True, slots=True)
class IncidentConfig:
    topic: str  # the input topic (part of incident ids)
    window: int = 35  # the defaults: WorkerSettings.incident_window, incident_open_share
    open_share: float = 0.2
    update_ms: int = 10_000
    quiet_ms: int = 60_000
    max_keys: int = 100_000

    @property
    def open_count(self) -> int:
        return open_count(self.window, self.open_share)


class IncidentTracker:
    def __init__(self, config: IncidentConfig):
        self.config = config
        self._full = (1 << config.window) - 1
        self._open_count = config.open_count
        # (partition, key) → state; dict order = least recently touched first (eviction)
        self.states: dict[tuple[int, bytes | None], KeyState] = {}
        self.applied: dict[int, int] = {}  # partition → next offset not yet applied
        self.stream_ms: dict[int, int] = {}  # partition → largest event time seen
        self._due: dict[int, int] = {}  # partition → no key resolves before this stream time
        self._deadlines = Deadlines()  # what expired, without a scan of every key
        self._open_now: int | None = 0  # open incidents; None: count them again
        self._journals: list[_Journal] = []  # undelivered batches, oldest first
        self._queued: list = []  # re-announcements for the next batch
        self._journal: _Journal | None = None
        self._out: Observed | None = None
        # (partition, key) → its state as packed at the end of the last batch that changed
        # it: a state changes only in `observe`, and every state a batch touched is packed
        # for the changelog at its end, so this is what the journal keeps of it.
        self._packed: dict[tuple[int, bytes | None], bytes] = {}

    # -- gauges -------------------------------------------------------------------

    def open_incidents(self) -> int:
        if self._open_now is None:  # after a rollback, restore or dropped partitions
            self._open_now = sum(1 for s in self.states.values() if s.incident is not None)
        return self._open_now

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
            self._apply(rows)
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

    def _apply(self, rows: Rows) -> None:
        out = self._out
        order = np.lexsort((rows.row, rows.offset, rows.partition))
        part = rows.partition[order]
        offs = rows.offset[order]
        ts = rows.ts[order]
        flags = rows.is_anomaly[order]
        # Only rows that are anomalous, or whose key has state, change anything: the
        # rows of a key that has state now or an anomalous row in this batch are the
        # candidates, decided per record in C; each is checked again when its turn comes.
        cand = flags | self._hot_records(rows)[rows.record[order]]
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
                self._rows(p, rows, order[fresh:hi][at], stream[at], whole)
            self.stream_ms[p] = int(stream[-1])
            self.applied[p] = int(offs[hi - 1]) + 1
            out.applied[p] = (self.applied[p], self.stream_ms[p])

    def _hot_records(self, rows: Rows) -> np.ndarray:
        """Per record: does its (partition, key) hold state, or have an anomalous row here?"""
        keys = rows.keys
        hot = np.zeros(len(keys), dtype=bool)
        anomalous = np.flatnonzero(rows.is_anomaly)
        if not self.states and not len(anomalous):
            return hot
        rec_p = np.full(len(keys), -1, dtype=np.int64)  # records without rows: no partition
        rec_p[rows.record] = rows.partition
        sks = list(zip(rec_p.tolist(), keys, strict=True))
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

    def _run(self, p: int, key, rows: Rows, c: _Cand, lo: int, hi: int) -> None:
        """Candidate rows lo .. hi - 1, all of one key. Its normal rows between two
        anomalous ones change the key's state all in the same way, so a stretch of them
        is applied at once when no sweep could act within it; the rest goes row by row."""
        sk = (p, key)
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
                and int(c.stream[m - 1]) < self._due.get(p, -(1 << 62))
            ):
                self._stretch(p, key, state, c.pos(m - 1), c.ts[k:m])
                k = m
                continue
            anomalous = k == m
            if state is None and not anomalous:
                k = m  # the key holds nothing: its normal rows up to the next anomaly are no-ops
                continue
            self._sweep(p, int(c.stream[k]))
            self._row(p, key, rows, int(c.idx[k]), pos, int(c.ts[k]), anomalous)
            k += 1

    def _stretch(self, p: int, key, state: KeyState, last: tuple, ts: np.ndarray) -> None:
        """What `_row` does to a key with state, row after row, for normal rows at
        event times ts, the last one at position `last`, where no sweep acts."""
        cfg = self.config
        sk = (p, key)
        self._touch(sk)
        del self.states[sk]  # re-inserted below: most recently touched last
        inc = state.incident
        if inc is not None:
            if inc.dirty:
                hit = np.flatnonzero(ts >= inc.announced_ms + cfg.update_ms)
                if len(hit):  # the row that sends the update
                    q = int(hit[0])
                    inc.records += q + 1
                    inc.updated_ms = max(inc.updated_ms, int(ts[: q + 1].max()))
                    self._announce(key, inc, "open")
                    ts = ts[q + 1 :]
            if len(ts):
                inc.records += len(ts)
                inc.updated_ms = max(inc.updated_ms, int(ts.max()))
        else:
            mask = state.mask
            if state.closed is None:
                # the row at which the window's last anomaly slides out forgets the key
                gone = cfg.window - ((mask & -mask).bit_length() - 1) if mask else 1
                if gone <= len(ts):
                    if gone > 1:
                        self._due[p] = min(
                            self._due.get(p, 1 << 62), state.last_anomaly_ms + cfg.quiet_ms
                        )
                    self._changed(sk, None)
                    return
            state.mask = (mask << len(ts)) & self._full
            del state.pending[: len(state.pending) - state.mask.bit_count()]
        state.pos = last
        self.states[sk] = state
        self._placed(sk, state)
        self._due[p] = min(self._due.get(p, 1 << 62), state.last_anomaly_ms + cfg.quiet_ms)
        self._changed(sk, state)

    def _row(self, p: int, key, rows: Rows, i: int, pos: tuple, ts: int, anomalous: bool) -> None:
        cfg, states = self.config, self.states
        sk = (p, key)
        state = states.get(sk)
        if state is None:
            if not anomalous:
                return
            if len(states) >= cfg.max_keys:
                self._evict_for_one()
            self._touch(sk)
            state = KeyState()
        else:
            if pos <= state.pos:
                self._out.skipped += 1  # already in this key's state (see KeyState.pos)
                return
            self._touch(sk)
            del states[sk]  # re-inserted below: most recently touched last
        state.pos = pos
        a = None
        if anomalous:
            a = Anomaly(
                ts,
                (p, pos[0], pos[1]),
                float(rows.score[i]),
                float(rows.p_value[i]),
                rows.top(i),
                rows.version,
            )
            state.last_anomaly_ms = max(state.last_anomaly_ms, ts)
        inc = state.incident
        if inc is not None:
            inc.records += 1
            inc.updated_ms = max(inc.updated_ms, ts)
            if a is not None:
                inc.anomalies += 1
                inc.last = a.src
                inc.last_anomaly_ms = state.last_anomaly_ms
                if a.score > inc.strongest.score:
                    inc.strongest = a
                inc.dirty = True
            if inc.dirty and ts - inc.announced_ms >= cfg.update_ms:
                self._announce(key, inc, "open")
        else:
            state.mask = ((state.mask << 1) | (a is not None)) & self._full
            if a is not None:
                state.pending.append(a)
            del state.pending[: len(state.pending) - state.mask.bit_count()]
            if a is not None and len(state.pending) >= self._open_count:
                state.incident = self._open(p, key, state, a)
                state.mask, state.pending = 0, []
            elif not state.pending and state.closed is None:
                self._changed(sk, None)
                return
        states[sk] = state
        quiet = state.last_anomaly_ms + cfg.quiet_ms  # the deadline, see _deadline
        self._deadlines.placed(
            sk, quiet if state.incident is not None or state.pending else quiet + cfg.quiet_ms
        )
        self._due[p] = min(self._due.get(p, 1 << 62), quiet)
        self._out.changed.setdefault(p, {})[key] = state

    def _open(self, p: int, key, state: KeyState, at: Anomaly) -> Incident:
        pending = state.pending
        inc = Incident(
            id=incident_id(self.config.topic, at.src, key),
            started_ms=min(a.ts for a in pending),
            records=state.mask.bit_length(),
            anomalies=len(pending),
            strongest=max(pending, key=lambda a: a.score),
            first=pending[0].src,
            last=at.src,
            last_anomaly_ms=state.last_anomaly_ms,
            updated_ms=max(a.ts for a in pending),
            announced_ms=at.ts,
        )
        self._out.opened += 1
        self._opened(1)
        self._announce(key, inc, "open")
        return inc

    def _deadline(self, s: KeyState) -> int:
        """Stream time at which the key's state next expires."""
        quiet = self.config.quiet_ms
        if s.incident is not None or s.pending:
            return s.last_anomaly_ms + quiet
        return s.last_anomaly_ms + 2 * quiet  # only a closed incident's message is left

    def _sweep(self, p: int, stream: int) -> None:
        """Resolve (or forget) what expired on partition p: quiet long enough."""
        if stream < self._due.get(p, -(1 << 62)):
            return
        for sk in self._deadlines.expired(p, stream, self.states, self._deadline):
            self._expire(sk)
        # a lower bound of every deadline on p until a rollback or restore
        self._due[p] = self._deadlines.lower_bound(p)

    def _opened(self, n: int) -> None:
        if self._open_now is not None:
            self._open_now += n

    def _placed(self, sk, state: KeyState, moved: bool = True) -> None:
        """sk holds `state` now (`moved`: at the end of the dict order)."""
        self._deadlines.placed(sk, self._deadline(state), moved)

    def _expire(self, sk) -> None:
        self._touch(sk)
        state = self.states.pop(sk)
        if state.incident is not None:
            self._out.resolved += 1
            state.closed = self._announce(sk[1], state.incident, "resolved", "quiet").decode()
            state.incident = None
            self._opened(-1)
        elif state.pending:
            state.mask, state.pending = 0, []
        else:
            state.closed = None
        if state.closed is None:
            self._changed(sk, None)
        else:
            self.states[sk] = state
            self._placed(sk, state)
            self._changed(sk, state)

    def _drop(self, sk, resolution: str) -> None:
        self._touch(sk)
        state = self.states.pop(sk)
        if state.incident is not None:
            self._out.resolved += 1
            self._out.evicted += resolution == "evicted"
            self._announce(sk[1], state.incident, "resolved", resolution)
            self._opened(-1)
        self._changed(sk, None)

    def _evict_for_one(self) -> None:
        while len(self.states) >= self.config.max_keys:
            self._drop(next(iter(self.states)), "evicted")

    # -- messages -----------------------------------------------------------------

    def _announce(self, key, inc: Incident, status: str, resolution: str | None = None) -> bytes:
        value = self._message(key, inc, status, resolution, inc.seq)
        inc.seq += 1
        inc.announced_ms = inc.updated_ms
        inc.dirty = False
        self._out.messages.append((key, value, [("schema", SCHEMA_HEADER)]))
        return value

    def _message(self, key, inc: Incident, status: str, resolution: str | None, seq: int) -> bytes:
        x = inc.strongest
        p = inc.first[0]
        msg = {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "incident_id": inc.id,
            "sequence": seq,
            "key": None if key is None else key.decode("utf-8", "backslashreplace"),
            "status": status,
            "resolution": resolution,
            "severity": severity(x.p),
            "started_at_ms": inc.started_ms,
            "updated_at_ms": inc.updated_ms,
            "ended_at_ms": inc.last_anomaly_ms if status == "resolved" else None,
            "records": inc.records,
            "anomalies": inc.anomalies,
            "max_score": x.score,
            "max_score_p_value": x.p,
            "top_features": [
                {"name": n, "value": v, "expected": e, "contribution": c} for n, v, e, c in x.top
            ],
            "model": {"version": x.version},
            "source": {
                "topic": self.config.topic,
                "partition": p,
                "first_anomaly": _src(inc.first),
                "last_anomaly": _src(inc.last),
            },
        }
        return orjson.dumps(msg)

    # -- journal and changes -------------------------------------------------------

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

    def _changed(self, sk, state: KeyState | None) -> None:
        self._out.changed.setdefault(sk[0], {})[sk[1]] = None if state is None else state

    def settled(self, batches: int = 1) -> None:
        """The oldest `batches` observed batches were delivered: forget their journals."""
        del self._journals[:batches]

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
                value = self._message(key, inc, "open", None, max(0, inc.seq - 1))
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


def _src(src: Src) -> dict:
    d = {"partition": src[0], "offset": src[1]}
    if src[2] >= 0:
        d["row"] = src[2]
    return d
