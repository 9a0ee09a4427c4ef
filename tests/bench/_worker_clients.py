"""The client processes of the worker benchmark (tests/bench/worker.py starts them).

    python -m tests.bench._worker_clients fill BOOTSTRAP DATA.npy TOPIC ENCODING [ROWS_PER_RECORD]
    python -m tests.bench._worker_clients steady BOOTSTRAP DATA.npy TOPIC ENCODING RATE SECONDS
    python -m tests.bench._worker_clients passthrough THRESHOLD
    python -m tests.bench._worker_clients naive

`passthrough` and `naive` read WORKER_*/KAFKA_* like `python -m worker` and open their
consumer and producer with the worker's own `open_clients`, so all three loops run
with the same client settings; they stop after WORKER_MAX_RECORDS records. The
passthrough is the ceiling: it sends and commits asynchronously and never waits for
an acknowledgement (until its last batch); the naive loop waits for every one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from kafka import KafkaProducer

from worker.allocator import keep_freed_memory
from worker.batcher import MicroBatcher
from worker.checkpoint import read_latest
from worker.clients import KafkaClients, KeyPartitions, open_clients
from worker.codec import Codec, encode_float32, encode_float32_rows, encode_json
from worker.delivery import AtLeastOnce, OutputTopics, _send
from worker.events import build_events, dlq_record
from worker.scoring import BatchScores, Scorer, load_scorer
from worker.settings import WorkerSettings
from worker.step import BatchOutcome, next_offsets, score_records

# The entities (Kafka keys), round robin: 64 unless BENCH_KEYS says otherwise (an A/B
# of the incident tracker's cost with many keys; not part of `make bench`).
KEYS = [b"sensor-%d" % i for i in range(int(os.environ.get("BENCH_KEYS", "64")))]

# Pre-fill: as fast as kafka-python goes; acks=1 because nothing is measured here.
FILL_PRODUCER = dict(
    acks=1, linger_ms=20, batch_size=1 << 20, max_request_size=8 << 20, compression_type=None
)
# The steady producer of the latency run: what a well-behaved upstream service would use.
STEADY_PRODUCER = dict(acks="all", linger_ms=5, batch_size=256 * 1024, compression_type=None)


def encode(
    x: np.ndarray, encoding: str, rows_per_record: int = 1
) -> list[tuple[bytes, bytes, list]]:
    """(key, value, headers) per record, through the codec's own encoders."""
    out = []
    if encoding == "json":
        for i, row in enumerate(x.tolist()):
            key = KEYS[i % len(KEYS)]
            out.append((key, encode_json(row, id=f"{key.decode()}/{i}"), []))
    elif encoding == "float32":
        for i, row in enumerate(x):
            value, headers = encode_float32(row)
            out.append((KEYS[i % len(KEYS)], value, headers))
    elif encoding == "rows":
        for i, start in enumerate(range(0, len(x) - rows_per_record + 1, rows_per_record)):
            value, headers = encode_float32_rows(x[start : start + rows_per_record])
            out.append((KEYS[i % len(KEYS)], value, headers))
    else:
        raise ValueError(encoding)
    return out


def fill(bootstrap: str, data: str, topic: str, encoding: str, rows_per_record: int = 1) -> dict:
    records = encode(np.load(data), encoding, rows_per_record)
    producer = KafkaProducer(bootstrap_servers=bootstrap, **FILL_PRODUCER)
    t0 = time.perf_counter()
    for key, value, headers in records:
        producer.send(topic, key=key, value=value, headers=headers)
    producer.flush()
    seconds = time.perf_counter() - t0
    producer.close()
    return {"records": len(records), "seconds": seconds, "records_per_s": len(records) / seconds}


def steady(
    bootstrap: str, data: str, topic: str, encoding: str, rate: float, seconds: float
) -> dict:
    """Send at `rate` records/s for `seconds`; kafka-python stamps each record at send()."""
    records = encode(np.load(data)[:20_000], encoding)
    producer = KafkaProducer(bootstrap_servers=bootstrap, **STEADY_PRODUCER)
    total = int(rate * seconds)
    sent = 0
    t0 = time.perf_counter()
    while sent < total:
        due = min(total, int((time.perf_counter() - t0) * rate) + 1)
        while sent < due:
            key, value, headers = records[sent % len(records)]
            producer.send(topic, key=key, value=value, headers=headers)
            sent += 1
        time.sleep(0.001)
    elapsed = time.perf_counter() - t0
    producer.flush()
    producer.close()
    return {"sent": sent, "seconds": elapsed, "achieved_rate": sent / elapsed}


def _clients(settings: WorkerSettings) -> tuple[KafkaClients, Scorer, Codec]:
    clients = open_clients(settings, listener=None)  # the worker's own client configuration
    version = read_latest(settings.model_dir)
    scorer = load_scorer(Path(settings.model_dir) / version, device="cpu")
    return clients, scorer, Codec(scorer.feature_names, settings.max_record_bytes)


def passthrough(threshold: float) -> dict:
    """The ceiling: the worker's micro-batching, codec and event builder, with the model
    replaced by `max |x| >= threshold` (the benchmark picks the threshold so this flags
    as many rows as the model does); each batch's outputs are sent and its offsets
    committed with commit_async at once, never waiting for acknowledgements."""
    settings = WorkerSettings()
    clients, scorer, codec = _clients(settings)
    producer, consumer = clients.producer, clients.consumer
    last_offsets: dict = {}
    batcher = MicroBatcher.of(settings)
    k = scorer.top_k
    topics, keyed = OutputTopics.of(settings), KeyPartitions()
    n_max, done, outputs = settings.max_records, 0, 0
    while done < n_max:
        if batcher.due():
            batch = batcher.take()
            decoded = codec.decode(batch)
            n = len(decoded)
            stat = np.abs(decoded.rows).max(axis=1) if n else np.empty(0, np.float32)
            flagged = stat >= threshold
            explained = np.flatnonzero(flagged)  # like the worker: only rows that become events
            zeros = np.zeros((len(explained), k), dtype=np.float32)
            fake = BatchScores(
                scores=stat,
                p_values=np.zeros(n, np.float32),
                is_anomaly=flagged,
                explained=explained,
                top_index=np.zeros((len(explained), k), dtype=np.int64),
                top_contribution=zeros,
                top_expected=zeros,
            )
            events = (
                build_events(decoded, fake, scorer, False, int(time.time() * 1000)) if n else []
            )
            dlq = [dlq_record(r) for r in decoded.rejected]
            offsets = next_offsets(batch)
            # sent as the worker sends them (worker/delivery.py), futures left alone
            _send(producer, BatchOutcome(batch, events, dlq, offsets), topics, keyed)
            consumer.commit_async(offsets)
            last_offsets.update(offsets)
            done += len(batch)
            outputs += len(events)
            continue
        room = min(batcher.room(), n_max - done - len(batcher))
        polled = clients.consumer.poll(
            timeout_ms=int(batcher.wait_s(0.2) * 1000), max_records=max(1, room)
        )
        for records in polled.values():
            batcher.add(records)
        if len(batcher) and done + len(batcher) >= n_max:
            batcher.max_wait_s = 0.0  # bounded run: the last batch is due now
    producer.flush()
    consumer.commit(last_offsets)  # the async commits, made sure of
    clients.close()
    return {"records": done, "outputs": outputs}


def naive() -> dict:
    """The per-record worker: poll one, decode, score a 1-row batch, send, flush,
    commit synchronously."""
    settings = WorkerSettings()
    clients, scorer, codec = _clients(settings)
    delivery = AtLeastOnce(settings)
    done, outputs = 0, 0
    while done < settings.max_records:
        for records in clients.consumer.poll(timeout_ms=200, max_records=1).values():
            for rec in records:
                outcome = score_records([rec], codec, scorer, emit_all=False)
                delivery.submit(outcome, clients.producer, clients.consumer)
                settled = delivery.settle(clients.producer, clients.consumer, wait="all")
                if settled.error is not None:
                    raise settled.error
                done += 1
                outputs += len(outcome.events)
    clients.close()
    return {"records": done, "outputs": outputs}


def main(argv: list[str]) -> int:
    role, args = argv[0], argv[1:]
    if role in ("passthrough", "naive"):
        keep_freed_memory()  # as `python -m worker` does: the same process settings
    if role == "fill":
        result = fill(args[0], args[1], args[2], args[3], int(args[4]) if len(args) > 4 else 1)
    elif role == "steady":
        result = steady(args[0], args[1], args[2], args[3], float(args[4]), float(args[5]))
    elif role == "passthrough":
        result = passthrough(float(args[0]))
    elif role == "naive":
        result = naive()
    else:
        raise SystemExit(f"unknown role {role!r}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
