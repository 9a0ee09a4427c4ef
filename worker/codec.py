"""Input codec: Kafka records → a float32 matrix, with every bad record named.

Formats (docs/contract.md#input-formats):

* JSON (default): ``{"id": "...", "features": [..] | {"name": v}, "ts": ms}`` or a bare
  JSON array of numbers.
* ``content-type: application/x-float32``: little-endian float32 × D, one vector.
* ``content-type: application/x-float32-rows``: little-endian float32 × (R·D), R
  vectors in one record (high-rate producers); each row gets its own decision.

Decoding is per record only where kafka-python hands us one object per record;
the numeric work happens once per batch in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import orjson

CONTENT_TYPE = "content-type"
FLOAT32 = b"application/x-float32"
FLOAT32_ROWS = b"application/x-float32-rows"
JSON = b"application/json"

# Reason codes carried in the DLQ record's `error` header.
UNDECODABLE = "undecodable"
INVALID_JSON = "invalid_json"
BAD_SHAPE = "bad_shape"
BAD_TYPE = "bad_type"
DIMENSION_MISMATCH = "dimension_mismatch"
MISSING_FEATURES = "missing_features"
UNKNOWN_FEATURES = "unknown_features"
NON_FINITE = "non_finite"
OVERSIZE = "oversize"
UNKNOWN_CONTENT_TYPE = "unknown_content_type"
REASONS = (
    UNDECODABLE,
    INVALID_JSON,
    BAD_SHAPE,
    BAD_TYPE,
    DIMENSION_MISMATCH,
    MISSING_FEATURES,
    UNKNOWN_FEATURES,
    NON_FINITE,
    OVERSIZE,
    UNKNOWN_CONTENT_TYPE,
)

_NUMBER_TYPES = frozenset((float, int))


@dataclass(frozen=True, slots=True)
class Rejected:
    record: Any  # the ConsumerRecord, passed through to the DLQ untouched
    code: str
    detail: str


@dataclass(slots=True)
class Decoded:
    """Valid rows of a batch and where each came from.

    rows[i] came from records[record_index[i]]; row_index[i] is its position inside
    a multi-row record, or -1 for a single-vector record.
    """

    rows: np.ndarray
    record_index: np.ndarray
    row_index: np.ndarray
    records: list[Any]
    ids: list[str | None]  # per record
    timestamps: list[int | None]  # per record: the `ts` field, when given
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def _content_type(record) -> bytes | None:
    for k, v in record.headers or ():
        if k == CONTENT_TYPE:
            return v
    return None


class Codec:
    """Decodes records for a model with the given feature names."""

    def __init__(self, feature_names: list[str], max_record_bytes: int = 1 << 20):
        self.feature_names = list(feature_names)
        self.dim = len(self.feature_names)
        self.max_record_bytes = max_record_bytes
        self._position = {n: i for i, n in enumerate(self.feature_names)}
        self._names = frozenset(self.feature_names)

    def _features_from_json(self, doc) -> tuple[list | None, str | None, int | None, str, str]:
        """(features, id, ts, error code, detail) from a parsed JSON document."""
        if isinstance(doc, list):
            return doc, None, None, "", ""
        if not isinstance(doc, dict):
            return (
                None,
                None,
                None,
                BAD_SHAPE,
                f"expected an object or an array, got {type(doc).__name__}",
            )
        feats = doc.get("features")
        rid = doc.get("id")
        ts = doc.get("ts")
        if rid is not None and not isinstance(rid, str | int):
            return None, None, None, BAD_TYPE, "id must be a string or an integer"
        if ts is not None and (not isinstance(ts, int) or isinstance(ts, bool)):
            return None, None, None, BAD_TYPE, "ts must be an integer (epoch milliseconds)"
        rid = None if rid is None else str(rid)
        if isinstance(feats, dict):
            names = feats.keys()
            if len(feats) != self.dim or names != self._names:
                missing = sorted(self._names - names)
                if missing:
                    return None, rid, ts, MISSING_FEATURES, f"missing {missing[:5]}"
                unknown = sorted(set(names) - self._names)
                return None, rid, ts, UNKNOWN_FEATURES, f"unknown {unknown[:5]}"
            ordered = [None] * self.dim
            pos = self._position
            for name, v in feats.items():
                ordered[pos[name]] = v
            return ordered, rid, ts, "", ""
        if isinstance(feats, list):
            return feats, rid, ts, "", ""
        if feats is None:
            return None, rid, ts, BAD_SHAPE, "no 'features' field"
        return (
            None,
            rid,
            ts,
            BAD_SHAPE,
            f"'features' must be an array or an object, got {type(feats).__name__}",
        )

    def decode(self, records: list) -> Decoded:
        dim = self.dim
        json_rows: list[list] = []
        json_rec: list[int] = []
        bin_chunks: list[bytes] = []
        bin_rec: list[int] = []
        bin_counts: list[int] = []
        bin_multi: list[bool] = []  # float32-rows (a row index per vector), not float32
        kept: list = []
        ids: list[str | None] = []
        tss: list[int | None] = []
        rejected: list[Rejected] = []
        row_bytes = 4 * dim
        for rec in records:
            value = rec.value
            if value is None:
                rejected.append(Rejected(rec, UNDECODABLE, "empty value (tombstone)"))
                continue
            if len(value) > self.max_record_bytes:
                rejected.append(
                    Rejected(rec, OVERSIZE, f"{len(value)} bytes > {self.max_record_bytes}")
                )
                continue
            ctype = _content_type(rec) if rec.headers else None
            if ctype is None or ctype == JSON:
                try:
                    doc = orjson.loads(value)
                except orjson.JSONDecodeError as e:
                    msg = str(e)
                    code = (
                        UNDECODABLE
                        if "UTF-8" in msg
                        else NON_FINITE
                        if "infinity" in msg
                        else INVALID_JSON
                    )
                    rejected.append(Rejected(rec, code, str(e)[:200]))
                    continue
                feats, rid, ts, code, detail = self._features_from_json(doc)
                if code:
                    rejected.append(Rejected(rec, code, detail))
                    continue
                if len(feats) != dim:
                    rejected.append(
                        Rejected(
                            rec, DIMENSION_MISMATCH, f"{len(feats)} features, model expects {dim}"
                        )
                    )
                    continue
                json_rows.append(feats)
                json_rec.append(len(kept))
                kept.append(rec)
                ids.append(rid)
                tss.append(ts)
            elif ctype == FLOAT32 or ctype == FLOAT32_ROWS:
                n = len(value)
                if n == 0 or n % row_bytes or (ctype == FLOAT32 and n != row_bytes):
                    rejected.append(
                        Rejected(
                            rec,
                            DIMENSION_MISMATCH,
                            f"{n} bytes is not float32 × {dim}"
                            + (" × rows" if ctype == FLOAT32_ROWS else ""),
                        )
                    )
                    continue
                bin_chunks.append(value)
                bin_counts.append(n // row_bytes)
                bin_multi.append(ctype == FLOAT32_ROWS)
                bin_rec.append(len(kept))
                kept.append(rec)
                ids.append(None)
                tss.append(None)
            else:
                rejected.append(Rejected(rec, UNKNOWN_CONTENT_TYPE, ctype.decode("latin-1")[:100]))
        if json_rows and not set(map(type, chain.from_iterable(json_rows))) <= _NUMBER_TYPES:
            # Rare: some row holds a string, bool, null or object (numpy would coerce
            # "1.5" and true). Find those rows one by one and reject them.
            ok = [set(map(type, r)) <= _NUMBER_TYPES for r in json_rows]
            for good, k in zip(ok, json_rec, strict=True):
                if not good:
                    rejected.append(Rejected(kept[k], BAD_TYPE, "features must all be numbers"))
            json_rec = [k for good, k in zip(ok, json_rec, strict=True) if good]
            json_rows = [r for good, r in zip(ok, json_rows, strict=True) if good]
        parts, rec_parts, row_parts = [], [], []
        if json_rows:
            try:
                with np.errstate(over="ignore"):  # 1e39 → inf, rejected as non-finite below
                    parts.append(np.array(json_rows, dtype=np.float32))
            except OverflowError:  # an integer too large for a float: find it row by row
                arr = np.empty((len(json_rows), dim), dtype=np.float32)
                for i, r in enumerate(json_rows):
                    try:
                        arr[i] = r
                    except OverflowError:
                        arr[i] = np.inf
                parts.append(arr)
            rec_parts.append(np.asarray(json_rec, dtype=np.int64))
            row_parts.append(np.full(len(json_rows), -1, dtype=np.int64))
        if bin_chunks:
            counts = np.asarray(bin_counts, dtype=np.int64)
            # bytearray: one copy that leaves the rows writable (torch wants that).
            parts.append(
                np.frombuffer(bytearray(b"".join(bin_chunks)), dtype="<f4").reshape(-1, dim)
            )
            rec_parts.append(np.repeat(np.asarray(bin_rec, dtype=np.int64), counts))
            multi = np.asarray(bin_multi, dtype=bool)
            starts = np.cumsum(counts) - counts
            within = np.arange(counts.sum()) - np.repeat(starts, counts)
            row_parts.append(np.where(np.repeat(multi, counts), within, -1))
        if not parts:
            empty = np.empty(0, dtype=np.int64)
            return Decoded(np.empty((0, dim), np.float32), empty, empty, kept, ids, tss, rejected)
        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        rec_idx = np.concatenate(rec_parts) if len(rec_parts) > 1 else rec_parts[0]
        row_idx = np.concatenate(row_parts) if len(row_parts) > 1 else row_parts[0]
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad_recs = set(rec_idx[~finite].tolist())
            for i in sorted(bad_recs):
                rejected.append(Rejected(kept[i], NON_FINITE, "NaN or Inf in features"))
            # A multi-row record with one bad row is rejected whole: it is one record.
            keep = ~np.isin(rec_idx, list(bad_recs))
            rows, rec_idx, row_idx = rows[keep], rec_idx[keep], row_idx[keep]
        return Decoded(rows, rec_idx, row_idx, kept, ids, tss, rejected)


def encode_json(features, id: str | None = None, ts: int | None = None) -> bytes:
    doc: dict[str, Any] = {"features": [float(v) for v in features]}
    if id is not None:
        doc["id"] = id
    if ts is not None:
        doc["ts"] = int(ts)
    return orjson.dumps(doc)


def encode_float32(features) -> tuple[bytes, list[tuple[str, bytes]]]:
    return np.asarray(features, dtype="<f4").tobytes(), [(CONTENT_TYPE, FLOAT32)]


def encode_float32_rows(rows) -> tuple[bytes, list[tuple[str, bytes]]]:
    return np.ascontiguousarray(rows, dtype="<f4").tobytes(), [(CONTENT_TYPE, FLOAT32_ROWS)]
