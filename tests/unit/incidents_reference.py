"""The incident tracker's simple per-row path, kept as the test oracle of
worker/incidents.py (issue #12): the tracker as it was before its batch-wise fast path
(commit b6516ba), every row looked at one by one. tests/unit/test_incidents_fast.py runs
random streams through both and requires identical messages, changelog records, state,
counts and rollbacks. The records, the config, incident ids and severities are the
production module's own."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import orjson

from worker.incident_messages import (
    KIND,
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    _src,
    incident_id,
    severity,
)
from worker.incident_records import Anomaly, Incident, KeyState, Observed, Rows
from worker.incidents import IncidentConfig


@dataclass(slots=True)
class _Journal:
    """The state before one batch touched it: what `rollback` puts back."""

    states: dict = field(default_factory=dict)  # (p, key) → KeyState copy | None
    marks: dict = field(default_factory=dict)  # p → (applied, stream) | None
    queued: list = field(default_factory=list)  # re-announcements this batch carried


def _copy(state: KeyState | None) -> KeyState | None:
    return None if state is None else KeyState.unpack(state.pack())


class ReferenceTracker:
    def __init__(self, config: IncidentConfig):
        self.config = config
        self._full = (1 << config.window) - 1
        # (partition, key) → state; dict order = least recently touched first (eviction)
        self.states: dict[tuple[int, bytes | None], KeyState] = {}
        self.applied: dict[int, int] = {}  # partition → next offset not yet applied
        self.stream_ms: dict[int, int] = {}  # partition → largest event time seen
        self._due: dict[int, int] = {}  # partition → no key resolves before this stream time
        self._journals: list[_Journal] = []  # undelivered batches, oldest first
        self._queued: list = []  # re-announcements for the next batch
        self._journal: _Journal | None = None
        self._out: Observed | None = None

    # -- gauges -------------------------------------------------------------------

    def open_incidents(self) -> int:
        return sum(1 for s in self.states.values() if s.incident is not None)

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
        for changed in out.changed.values():
            for key, state in changed.items():
                changed[key] = None if state is None else state.pack()
        self._journal = self._out = None
        return out

    def _apply(self, rows: Rows) -> None:
        out = self._out
        order = np.lexsort((rows.row, rows.offset, rows.partition))
        part = rows.partition[order]
        offs = rows.offset[order]
        ts = rows.ts[order]
        flags = rows.is_anomaly[order]
        keys = rows.keys
        states = self.states
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
            # Only rows that are anomalous, or whose key has state, change anything.
            fl = flags[fresh:hi].tolist()
            if states or True in fl:
                idx = order[fresh:hi].tolist()
                rk = rows.record[order[fresh:hi]].tolist()
                for j in range(hi - fresh):
                    # A row changes something only if it is anomalous or its key has state.
                    if fl[j] or (p, keys[rk[j]]) in states:
                        self._sweep(p, int(stream[j]))
                        self._row(p, keys[rk[j]], rows, idx[j], fl[j])
            self.stream_ms[p] = int(stream[-1])
            self.applied[p] = int(offs[hi - 1]) + 1
            out.applied[p] = (self.applied[p], self.stream_ms[p])

    def _row(self, p: int, key, rows: Rows, i: int, anomalous: bool) -> None:
        cfg = self.config
        sk = (p, key)
        state = self.states.get(sk)
        ts = int(rows.ts[i])
        if state is None:
            if not anomalous:
                return
            self._evict_for_one()
            self._touch(sk)
            state = KeyState()
        else:
            if (int(rows.offset[i]), int(rows.row[i])) <= state.pos:
                self._out.skipped += 1  # already in this key's state (see KeyState.pos)
                return
            self._touch(sk)
            del self.states[sk]  # re-inserted below: most recently touched last
        state.pos = (int(rows.offset[i]), int(rows.row[i]))
        a = None
        if anomalous:
            a = Anomaly(
                ts,
                (p, int(rows.offset[i]), int(rows.row[i])),
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
            if a is not None and len(state.pending) >= cfg.open_count:
                state.incident = self._open(p, key, state, a)
                state.mask, state.pending = 0, []
            elif not state.pending and state.closed is None:
                self._changed(sk, None)
                return
        self.states[sk] = state
        self._due[p] = min(self._due.get(p, 1 << 62), state.last_anomaly_ms + cfg.quiet_ms)
        self._changed(sk, state)

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
        for sk in [
            sk for sk, s in self.states.items() if sk[0] == p and stream >= self._deadline(s)
        ]:
            self._expire(sk)
        # deadlines only move later, so this stays a lower bound until a rollback or restore
        self._due[p] = min(
            (self._deadline(s) for sk, s in self.states.items() if sk[0] == p), default=1 << 62
        )

    def _expire(self, sk) -> None:
        self._touch(sk)
        state = self.states.pop(sk)
        if state.incident is not None:
            self._out.resolved += 1
            state.closed = self._announce(sk[1], state.incident, "resolved", "quiet").decode()
            state.incident = None
        elif state.pending:
            state.mask, state.pending = 0, []
        else:
            state.closed = None
        if state.closed is None:
            self._changed(sk, None)
        else:
            self.states[sk] = state
            self._changed(sk, state)

    def _drop(self, sk, resolution: str) -> None:
        self._touch(sk)
        state = self.states.pop(sk)
        if state.incident is not None:
            self._out.resolved += 1
            self._out.evicted += resolution == "evicted"
            self._announce(sk[1], state.incident, "resolved", resolution)
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
            "stuck_features": inc.stuck,
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
        if sk not in self._journal.states:
            self._journal.states[sk] = _copy(self.states.get(sk))

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
        self._queued = [m for j in self._journals for m in j.queued] + self._queued
        for j in reversed(self._journals):
            for sk, old in j.states.items():
                self.states.pop(sk, None)
                if old is not None:
                    self.states[sk] = old
            for p, mark in j.marks.items():
                if mark is None:
                    self.applied.pop(p, None)
                    self.stream_ms.pop(p, None)
                else:
                    self.applied[p], self.stream_ms[p] = mark
        self._journals.clear()

    # -- partitions ------------------------------------------------------------------

    def partitions(self) -> set[int]:
        """Partitions the tracker holds anything of."""
        return {p for p, _ in self.states} | set(self.applied)

    def drop_partitions(self, partitions) -> None:
        """Forget the state of partitions this worker no longer holds."""
        gone = set(partitions)
        for sk in [sk for sk in self.states if sk[0] in gone]:
            del self.states[sk]
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
            state = self.states[(p, key)] = KeyState.unpack(raw)
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
        if applied is not None:
            self.applied[p] = applied
            self.stream_ms[p] = stream_ms
        return queued
