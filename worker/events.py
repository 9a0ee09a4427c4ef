"""Ready-to-send events (docs/contract.md#anomaly-events) and DLQ records (#dead-letter-records)."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import orjson

from worker.codec import Decoded, Rejected
from worker.scoring import BatchScores, Scorer

SCHEMA_VERSION = 1
SCHEMA_HEADER = b"cae-stream.anomaly.v1"


def event_schema() -> dict:
    return json.loads(resources.files("worker").joinpath("event.schema.json").read_text())


def _key_text(key: bytes | None) -> str | None:
    return None if key is None else key.decode("utf-8", "backslashreplace")


def build_events(
    decoded: Decoded, result: BatchScores, scorer: Scorer, emit_all: bool, now_ms: int
) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    """(key, value, headers) per event: anomalous rows only, or every row when emit_all."""
    selected = np.arange(len(decoded)) if emit_all else np.flatnonzero(result.is_anomaly)
    if selected.size == 0:
        return []
    # Explanations are indexed like result.explained, which must cover `selected`.
    where = np.searchsorted(result.explained, selected)
    if not np.array_equal(result.explained[np.minimum(where, len(result.explained) - 1)], selected):
        raise ValueError("build_events needs explanations for every selected row")
    names = scorer.feature_names
    model = {"version": scorer.version, "trained_at": scorer.manifest.created_at}
    headers = [("schema", SCHEMA_HEADER), ("model.version", scorer.version.encode())]
    threshold = scorer.threshold
    # One conversion per column, not per element.
    scores = result.scores[selected].tolist()
    p_values = result.p_values[selected].tolist()
    flags = result.is_anomaly[selected].tolist()
    rec_idx = decoded.record_index[selected].tolist()
    row_idx = decoded.row_index[selected].tolist()
    top_i = result.top_index[where].tolist()
    top_c = result.top_contribution[where].tolist()
    top_e = result.top_expected[where].tolist()
    top_v = np.take_along_axis(decoded.rows[selected], result.top_index[where], axis=1).tolist()
    out = []
    for j in range(len(scores)):
        rec = decoded.records[rec_idx[j]]
        row = row_idx[j]
        source = {
            "topic": rec.topic,
            "partition": rec.partition,
            "offset": rec.offset,
            "timestamp_ms": decoded.timestamps[rec_idx[j]] or rec.timestamp,
            "key": _key_text(rec.key),
        }
        event_id = f"{rec.topic}-{rec.partition}-{rec.offset}"
        if row >= 0:
            source["row"] = row
            event_id += f"-{row}"
        event = {
            "schema_version": SCHEMA_VERSION,
            "event_id": event_id,
            "id": decoded.ids[rec_idx[j]],
            "score": scores[j],
            "threshold": threshold,
            "p_value": p_values[j],
            "is_anomaly": flags[j],
            "top_features": [
                {"name": names[f], "value": v, "expected": e, "contribution": c}
                for f, v, e, c in zip(top_i[j], top_v[j], top_e[j], top_c[j], strict=True)
            ],
            "model": model,
            "source": source,
            "detected_at_ms": now_ms,
        }
        out.append((rec.key, orjson.dumps(event), headers))
    return out


def dlq_record(rej: Rejected) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    rec = rej.record
    headers = [
        ("error", rej.code.encode()),
        ("error.detail", rej.detail.encode("utf-8", "replace")[:1000]),
        ("source.topic", rec.topic.encode()),
        ("source.partition", str(rec.partition).encode()),
        ("source.offset", str(rec.offset).encode()),
    ]
    headers += [(k, v) for k, v in (rec.headers or ()) if k == "content-type"]
    return rec.key, rec.value, headers
