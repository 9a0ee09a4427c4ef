"""The per-key incident message on WORKER_INCIDENT_TOPIC (docs/contract.md#incidents):
its headers, its JSON body (described by worker/incident.schema.json, read by
worker.incident_records.incident_schema), its id and its severity. Pure data: nothing
here talks to Kafka."""

from __future__ import annotations

import hashlib

import orjson

from worker.incident_records import Incident, Src

SCHEMA_VERSION = 1
SCHEMA_HEADER = b"cae-stream.incident.v1"
KIND = "anomaly"
# Severity bands from the p-value of the incident's strongest row (upper bounds, inclusive).
SEVERITY_BANDS = ((1e-7, "critical"), (1e-5, "high"), (1e-3, "medium"), (1.0, "low"))


def severity(p_value: float) -> str:
    for bound, name in SEVERITY_BANDS:
        if p_value <= bound:
            return name
    return "low"


def incident_id(topic: str, src: Src, key: bytes | None) -> str:
    """Deterministic from the input: the opening row's position and the key."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{topic}\0{src[0]}\0{src[1]}\0{src[2]}\0".encode())
    h.update(b"\0" if key is None else b"\1" + key)
    return h.hexdigest()


def incident_message(
    topic: str, key, inc: Incident, status: str, resolution: str | None, seq: int
) -> bytes:
    """The message value: incident `inc` of entity `key` on input `topic`, as it
    stands, with sequence number `seq`."""
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
            "topic": topic,
            "partition": p,
            "first_anomaly": _src(inc.first),
            "last_anomaly": _src(inc.last),
        },
    }
    return orjson.dumps(msg)


def _src(src: Src) -> dict:
    d = {"partition": src[0], "offset": src[1]}
    if src[2] >= 0:
        d["row"] = src[2]
    return d
