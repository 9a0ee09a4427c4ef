"""The incident tracker's records (docs/contract.md#incidents): the scored rows it reads
(`Rows`, `rows_of`), the per-key state it keeps (`Anomaly`, `Incident`, `KeyState`) and
that state's changelog form on WORKER_INCIDENT_STATE_TOPIC, and the message schema
(the message itself: worker/incident_messages.py). Pure data: nothing here talks to
Kafka."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from operator import attrgetter

import numpy as np
import orjson

Top = list  # [[name, value, expected, contribution], ...] of one row, largest first
Src = tuple[int, int, int]  # partition, offset, row (-1: a single-vector record)


@dataclass(slots=True)
class Anomaly:
    """One anomalous row, as much as an incident needs of it."""

    ts: int
    src: Src
    score: float
    p: float
    top: Top
    version: str
    stuck: tuple[str, ...] = ()  # its stuck features (worker/repeats.py), if any
    # its packed form, made once: an anomaly never changes, and a key's state (its
    # window's anomalies) is packed again after every batch that touches the key
    _packed: orjson.Fragment | None = field(default=None, repr=False, compare=False)

    def pack(self) -> orjson.Fragment:
        """The JSON list [ts, src, score, p, top, version(, stuck)], for orjson.dumps."""
        if self._packed is None:
            v = [self.ts, list(self.src), self.score, self.p, self.top, self.version]
            self._packed = orjson.Fragment(
                orjson.dumps(v + [list(self.stuck)] if self.stuck else v)
            )
        return self._packed

    @classmethod
    def unpack(cls, v: list) -> Anomaly:
        return cls(v[0], tuple(v[1]), v[2], v[3], v[4], v[5], tuple(v[6]) if len(v) > 6 else ())


@dataclass(slots=True)
class Incident:
    id: str
    started_ms: int
    records: int
    anomalies: int
    strongest: Anomaly
    first: Src
    last: Src
    last_anomaly_ms: int
    updated_ms: int  # event time of the newest row counted
    announced_ms: int  # event time of the last message sent
    seq: int = 0  # messages sent for this incident
    dirty: bool = False  # changed since the last message
    stuck: list[str] = field(default_factory=list)  # features found stuck, in order

    def pack(self) -> dict:
        packed = {
            "id": self.id,
            "s": self.started_ms,
            "r": self.records,
            "a": self.anomalies,
            "x": self.strongest.pack(),
            "f": list(self.first),
            "l": list(self.last),
            "la": self.last_anomaly_ms,
            "u": self.updated_ms,
            "an": self.announced_ms,
            "q": self.seq,
            "d": self.dirty,
        }
        if self.stuck:
            packed["st"] = self.stuck
        return packed

    @classmethod
    def unpack(cls, v: dict) -> Incident:
        return cls(
            v["id"],
            v["s"],
            v["r"],
            v["a"],
            Anomaly.unpack(v["x"]),
            tuple(v["f"]),
            tuple(v["l"]),
            v["la"],
            v["u"],
            v["an"],
            v["q"],
            v["d"],
            v.get("st", []),
        )


@dataclass(slots=True)
class KeyState:
    mask: int = 0  # the window, bit 0 = newest row (unused while an incident is open)
    pending: list[Anomaly] = field(default_factory=list)  # the window's anomalies, oldest first
    last_anomaly_ms: int = 0
    incident: Incident | None = None
    # The resolve message of the key's last incident, kept for 2 × quiet after its last
    # anomalous row, so a restore can announce it again (docs/contract.md#incidents).
    closed: str | None = None
    # (offset, row) of the last row applied: a changelog record can land without its
    # partition's marker (a crash between the two), and then the rows between the
    # marker and this position are read again but must not count twice.
    pos: tuple[int, int] = (-1, -1)

    def pack(self) -> bytes:
        return orjson.dumps(
            {
                "m": self.mask,
                "p": [a.pack() for a in self.pending],
                "la": self.last_anomaly_ms,
                "i": self.incident.pack() if self.incident else None,
                "c": self.closed,
                "o": list(self.pos),
            }
        )

    @classmethod
    def unpack(cls, raw: bytes) -> KeyState:
        v = orjson.loads(raw)
        inc = v.get("i")
        return cls(
            v["m"],
            [Anomaly.unpack(a) for a in v["p"]],
            v["la"],
            Incident.unpack(inc) if inc else None,
            v.get("c"),
            tuple(v.get("o", (-1, -1))),
        )


@dataclass(slots=True)
class Rows:
    """One batch's scored rows, in any order (the tracker sorts them by position)."""

    partition: np.ndarray  # int64 [N]
    offset: np.ndarray  # int64 [N]
    row: np.ndarray  # int64 [N], -1 for a single-vector record
    ts: np.ndarray  # int64 [N] event time, ms
    is_anomaly: np.ndarray  # bool [N]
    score: np.ndarray  # float [N]
    p_value: np.ndarray  # float [N]
    record: np.ndarray  # int64 [N] index into `keys`
    keys: list  # per record: bytes | None
    top: Callable[[int], Top]  # explanation of anomalous row i ([] if it has none)
    version: str
    # for the stuck-feature check (worker/repeats.py): the rows [N, D] in input units,
    # the model's continuous features and their names; the tracker fills `stuck`
    values: np.ndarray | None = None
    continuous: np.ndarray | None = None
    feature_names: list[str] = field(default_factory=list)
    stuck: dict[int, tuple[str, ...]] = field(default_factory=dict)  # row → stuck features

    def __len__(self) -> int:
        return len(self.partition)


def rows_of(
    decoded, result, feature_names: list[str], version: str, continuous: np.ndarray | None = None
) -> Rows:
    """The tracker's view of a scored batch (worker.codec.Decoded, worker.scoring.BatchScores);
    `continuous`: the model's features that a stuck-feature check watches (None: none)."""
    records = decoded.records
    n = len(records)
    kafka_ts = np.fromiter(map(attrgetter("timestamp"), records), dtype=np.int64, count=n)
    rec_ts = kafka_ts  # the record's `ts`, else its Kafka timestamp
    if any(decoded.timestamps):
        pairs = zip(decoded.timestamps, kafka_ts.tolist(), strict=True)
        rec_ts = np.fromiter((t or k for t, k in pairs), dtype=np.int64, count=n)
    rec_idx = decoded.record_index
    explained = result.explained

    def top(i: int) -> Top:
        w = int(np.searchsorted(explained, i))
        if w == len(explained) or explained[w] != i:  # a stuck row the model found normal
            return []
        return [
            [feature_names[f], float(decoded.rows[i, f]), float(e), float(c)]
            for f, e, c in zip(
                result.top_index[w].tolist(),
                result.top_expected[w].tolist(),
                result.top_contribution[w].tolist(),
                strict=True,
            )
        ]

    return Rows(
        partition=np.fromiter(map(attrgetter("partition"), records), np.int64, n)[rec_idx],
        offset=np.fromiter(map(attrgetter("offset"), records), np.int64, n)[rec_idx],
        row=decoded.row_index,
        ts=rec_ts[rec_idx],
        is_anomaly=result.is_anomaly,
        score=result.scores,
        p_value=result.p_values,
        record=rec_idx,
        keys=list(map(attrgetter("key"), records)),
        top=top,
        version=version,
        values=decoded.rows,
        continuous=continuous,
        feature_names=feature_names,
    )


def incident_schema() -> dict:
    return json.loads(resources.files("worker").joinpath("incident.schema.json").read_text())


@dataclass(slots=True)
class Observed:
    """What one batch did to the tracker: messages to publish, state to write, counts."""

    messages: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = field(
        default_factory=list
    )
    # partition → {key: packed state, or None for a deleted key}
    changed: dict[int, dict] = field(default_factory=dict)
    applied: dict[int, tuple[int, int]] = field(default_factory=dict)  # p → (next offset, stream)
    opened: int = 0
    resolved: int = 0
    evicted: int = 0
    skipped: int = 0  # rows already applied before a restart


# -- the changelog (WORKER_INCIDENT_STATE_TOPIC) --------------------------------------
# Record keys: b"k" + the entity key, b"n" for the None key (compaction needs a key),
# and b"m" for the partition's marker: {"applied": next offset, "stream_ms": stream time}.

MARKER_KEY = b"m"


def state_key(key: bytes | None) -> bytes:
    return b"n" if key is None else b"k" + key


def entity_key(raw: bytes) -> bytes | None:
    return None if raw == b"n" else raw[1:]


def changelog_records(observed: Observed) -> list[tuple[int, bytes, bytes | None]]:
    """(partition, key, value) per changed key (None: a tombstone), then each marker."""
    out = [
        (p, state_key(key), value)
        for p, changed in observed.changed.items()
        for key, value in changed.items()
    ]
    for p, (applied, stream_ms) in observed.applied.items():
        out.append((p, MARKER_KEY, orjson.dumps({"applied": applied, "stream_ms": stream_ms})))
    return out


def read_changelog(records) -> tuple[dict, int | None, int | None]:
    """One partition's changelog records, oldest first → (entity key → packed state,
    applied, stream_ms): the last value per key wins; a tombstone deletes."""
    states: dict = {}
    applied = stream_ms = None
    for rec in records:
        if rec.key == MARKER_KEY:
            mark = orjson.loads(rec.value)
            applied, stream_ms = mark["applied"], mark["stream_ms"]
        elif rec.key:
            key = entity_key(rec.key)
            if rec.value is None:
                states.pop(key, None)
            else:
                states[key] = rec.value
    return states, applied, stream_ms
