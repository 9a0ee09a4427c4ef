"""The per-key incident rule (docs/contract.md#incidents): what one key's rows do to
its state, and when its incident opens, updates, resolves or is evicted. The base of
the tracker (worker/incidents.py), which hands it the rows that matter, in order, and
journals each state before the rule first changes it in a batch (`_touch`).

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

What expired comes from a heap of deadlines (worker/incident_expiry.py), not a scan of
every key; the messages are worker/incident_messages.py's. Pure logic: nothing here
talks to Kafka.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from worker.incident_expiry import Deadlines
from worker.incident_messages import SCHEMA_HEADER, incident_id, incident_message
from worker.incident_records import Anomaly, Incident, KeyState, Observed, Rows


def open_count(window: int, share: float) -> int:
    """Anomalous rows of the window that open an incident: ⌈share · window⌉, at least 1."""
    return max(1, math.ceil(share * window - 1e-9))


@dataclass(frozen=True, slots=True)
class IncidentConfig:
    topic: str  # the input topic (part of incident ids)
    window: int = 35  # the defaults: WorkerSettings.incident_window, incident_open_share
    open_share: float = 0.2
    update_ms: int = 10_000
    quiet_ms: int = 60_000
    max_keys: int = 100_000
    stuck_records: int = 5  # WorkerSettings.stuck_records; 0: no stuck-feature check

    @property
    def open_count(self) -> int:
        return open_count(self.window, self.open_share)


def _add_stuck(inc: Incident, a: Anomaly) -> None:
    inc.stuck.extend(f for f in a.stuck if f not in inc.stuck)


class IncidentRule:
    """Per-key states and the rule applied to them one row (or one stretch of a key's
    normal rows) at a time."""

    def __init__(self, config: IncidentConfig):
        self.config = config
        self._full = (1 << config.window) - 1
        self._open_count = config.open_count
        # (partition, key) → state; dict order = least recently touched first (eviction)
        self.states: dict[tuple[int, bytes | None], KeyState] = {}
        self._due: dict[int, int] = {}  # partition → no key resolves before this stream time
        self._deadlines = Deadlines()  # what expired, without a scan of every key
        self._open_now: int | None = 0  # open incidents; None: count them again
        self._out: Observed | None = None  # what the batch being observed did

    # -- gauges -------------------------------------------------------------------

    def open_incidents(self) -> int:
        if self._open_now is None:  # after a rollback, restore or dropped partitions
            self._open_now = sum(1 for s in self.states.values() if s.incident is not None)
        return self._open_now

    # -- one key ------------------------------------------------------------------

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
                rows.stuck.get(i, ()),
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
                _add_stuck(inc, a)
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

    def _stretch(self, p: int, key, state: KeyState, last: tuple, ts: np.ndarray) -> int | None:
        """What `_row` does to a key with state, row after row, for normal rows at
        event times ts, the last one at position `last`, where no sweep acts. Returns
        the index in ts of the row that sent an update, if one did."""
        cfg = self.config
        sent = None
        sk = (p, key)
        self._touch(sk)
        del self.states[sk]  # re-inserted below: most recently touched last
        inc = state.incident
        if inc is not None:
            if inc.dirty:
                hit = np.flatnonzero(ts >= inc.announced_ms + cfg.update_ms)
                if len(hit):  # the row that sends the update
                    q = sent = int(hit[0])
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
                    return sent
            state.mask = (mask << len(ts)) & self._full
            del state.pending[: len(state.pending) - state.mask.bit_count()]
        state.pos = last
        self.states[sk] = state
        self._placed(sk, state)
        self._due[p] = min(self._due.get(p, 1 << 62), state.last_anomaly_ms + cfg.quiet_ms)
        self._changed(sk, state)
        return sent

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
        for a in pending:
            _add_stuck(inc, a)
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
        value = incident_message(self.config.topic, key, inc, status, resolution, inc.seq)
        inc.seq += 1
        inc.announced_ms = inc.updated_ms
        inc.dirty = False
        self._out.messages.append((key, value, [("schema", SCHEMA_HEADER)]))
        return value

    # -- changes --------------------------------------------------------------------

    def _touch(self, sk) -> None:
        """Called before this batch first changes sk's state: the tracker journals it."""
        raise NotImplementedError

    def _changed(self, sk, state: KeyState | None) -> None:
        self._out.changed.setdefault(sk[0], {})[sk[1]] = None if state is None else state
