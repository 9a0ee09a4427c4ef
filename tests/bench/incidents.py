"""The incident tracker's CPU cost per row, without Kafka (issue #12).

    .venv/bin/python -m tests.bench.incidents [--batches N] [--baseline-repo PATH]

Realistic micro-batches of 1 024 rows, already scored, go through
`IncidentTracker.observe` (and `settled`, as the worker calls it after delivery), one
process, one thread; the figure is CPU seconds (`time.process_time`) per row over the
batches after a warm-up, so that the tracker holds its steady-state keys; the median of
`--rounds` (3) such measurements, the trackers taking turns. Scenarios:

* keys 1 000 / 100 000: entities drawn at random per record, 1 % of rows anomalous
  (the default target false-positive rate), two input partitions (key → partition);
  1 000 keys also in batches of 4 096 rows, the worker's full batches under a backlog
  (the goal's figure stays the one of 1 024-row batches);
* open incidents: 1 000 keys of which 5 % are in an episode (half their rows anomalous),
  so those keys hold an open incident throughout;
* bench stream: 64 keys round robin and 1.7 % anomalous rows, as `make bench`'s worker
  loops send them (tests/bench/_worker_clients.py: most keys end up with an open
  incident that never goes quiet);
* rows: application/x-float32-rows, 256 vectors per record sharing the record's key,
  64 keys, 1.7 % anomalous vectors.

Every row has 16 continuous features that never repeat, so the stuck-feature check
(worker/repeats.py) runs on every batch as it does in the worker and finds nothing.

Event time advances 20 000 records/s. --baseline-repo PATH times that checkout's
worker/incidents.py (and the worker/incident*.py modules it imports, where PATH has
them) on the same batches (before/after). Results:
tests/bench/results/incidents.json.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np

import worker
from tests.bench.common import machine, markdown_table, now_iso, write_results
from worker.allocator import keep_freed_memory
from worker.incidents import IncidentConfig, IncidentTracker, Rows

NAME = "incidents"
T0 = 1_764_253_000_000
BATCH = 1024
GOAL_US = 1.0  # per row at 1 % anomalies, most keys without state
FEATURES = 16  # per row, all continuous (the stuck-feature check's work)

SCENARIOS = {
    # name: keys, anomalous share, rows per record, hot key share, hot anomalous share
    # (and rows per batch, when not BATCH)
    "1k keys, 1 %": (1_000, 0.01, 1, 0.0, 0.0),
    # the worker's full batches under a backlog (WORKER_MAX_BATCH_SIZE, 4 096 records)
    "1k keys, 1 %, batches of 4 096": (1_000, 0.01, 1, 0.0, 0.0, 4096),
    "100k keys, 1 %": (100_000, 0.01, 1, 0.0, 0.0),
    "1k keys, 1 %, 50 open incidents": (1_000, 0.01, 1, 0.05, 0.5),
    "bench stream: 64 keys, 1.7 %": (64, 0.017, 1, 0.0, 0.0),
    "rows: 256 per record, 64 keys, 1.7 %": (64, 0.017, 256, 0.0, 0.0),
}


def batches(
    n: int,
    keys: int,
    share: float,
    rows_per_record: int,
    hot_share: float,
    hot_rate: float,
    seed: int = 0,
    partitions: int = 2,
    records_per_s: int = 20_000,
    batch: int = BATCH,
) -> list[Rows]:
    """n batches of `batch` rows; key k lives on partition k % partitions."""
    rng = np.random.default_rng(seed)
    names = [b"sensor-%06d" % k for k in range(keys)]
    hot = rng.random(keys) < hot_share
    per = batch // rows_per_record
    next_offset = np.zeros(partitions, dtype=np.int64)
    out = []
    for b in range(n):
        rec = np.arange(b * per, (b + 1) * per)
        key_id = rec % keys if keys <= 64 else rng.integers(0, keys, per)
        part = key_id % partitions
        offs = np.empty(per, dtype=np.int64)
        for p in range(partitions):
            mine = part == p
            offs[mine] = next_offset[p] + np.arange(int(mine.sum()))
            next_offset[p] += int(mine.sum())
        ts = T0 + rec * 1000 // records_per_s
        r = np.repeat(np.arange(per), rows_per_record)
        rate = np.where(hot[key_id], hot_rate, share)[r]
        flags = rng.random(batch) < rate
        score = np.where(flags, 5 + rng.random(batch), rng.random(batch)).astype(np.float32)
        pval = np.where(flags, 1e-5 * rng.random(batch), 0.5).astype(np.float32)
        out.append(
            Rows(
                partition=part[r].astype(np.int64),
                offset=offs[r],
                row=(
                    np.tile(np.arange(rows_per_record), per)
                    if rows_per_record > 1
                    else np.full(batch, -1)
                ).astype(np.int64),
                ts=ts[r].astype(np.int64),
                is_anomaly=flags,
                score=score,
                p_value=pval,
                record=r.astype(np.int64),
                keys=[names[k] for k in key_id.tolist()],
                top=lambda i: [["f3", 7.5, 0.1, 0.6], ["f9", -6.2, 0.0, 0.3]],
                version="v1",
                # continuous readings that never repeat: the stuck-feature check runs
                # (as on any model whose features are continuous) and finds nothing
                values=rng.normal(size=(batch, FEATURES)).astype(np.float32),
                continuous=np.ones(FEATURES, dtype=bool),
                feature_names=[f"f{i}" for i in range(FEATURES)],
            )
        )
    return out


def measure(tracker_class, config_class, data: list[Rows], warmup: int) -> dict:
    tracker = tracker_class(config_class(topic="features"))
    messages = changed = 0
    for rows in data[:warmup]:
        tracker.observe(rows)
        tracker.settled()
    t0 = time.process_time()
    for rows in data[warmup:]:
        out = tracker.observe(rows)
        tracker.settled()
        messages += len(out.messages)
        changed += sum(len(c) for c in out.changed.values())
    cpu = time.process_time() - t0
    measured = sum(len(r) for r in data[warmup:])
    return {
        "cpu_us_per_row": round(1e6 * cpu / measured, 3),
        "rows": measured,
        "messages": messages,
        "changed_keys_per_batch": round(changed / (len(data) - warmup), 1),
        "keys_with_state": len(tracker.states),
        "open_incidents": tracker.open_incidents(),
    }


def _baseline(repo: str):
    """The tracker class of another checkout's worker/incidents.py, imported with the
    worker/incident*.py modules it imports from that checkout where it has them (the
    tracker spans several), else from this one."""
    root = str(Path(repo).resolve() / "worker")
    ours = {n: sys.modules.pop(n) for n in list(sys.modules) if n.startswith("worker.incident")}
    worker.__path__.insert(0, root)
    try:
        module = importlib.import_module("worker.incidents")
    finally:
        worker.__path__.remove(root)
        for n in [n for n in sys.modules if n.startswith("worker.incident")]:
            sys.modules["baseline_" + n] = sys.modules.pop(n)
            delattr(worker, n.split(".")[1])
        for n, m in ours.items():
            sys.modules[n] = m
            setattr(worker, n.split(".")[1], m)
    return module.IncidentTracker, module.IncidentConfig


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.incidents", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--batches", type=int, default=300, help="measured batches per scenario")
    p.add_argument(
        "--warmup",
        type=int,
        default=1300,
        help="batches before measuring (100k keys hold their steady-state keys after ~1 200)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measurements per scenario and tracker, taking turns; the median is reported "
        "(the first measurement of a process reads up to 30 %% slower)",
    )
    p.add_argument("--only", default="", help="scenario names containing this text")
    p.add_argument("--baseline-repo", help="also time this checkout's worker/incidents.py")
    p.add_argument("--no-write", action="store_true", help="leave results/incidents.json alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args([] if argv is None else argv)
    keep_freed_memory()  # the worker's process setting (worker/allocator.py)
    info = machine()
    trackers = {"tracker": (IncidentTracker, IncidentConfig)}
    if args.baseline_repo:
        trackers["baseline"] = _baseline(args.baseline_repo)
    results = []
    for name, (keys, share, per, hot, hot_rate, *size) in SCENARIOS.items():
        if args.only not in name:
            continue
        batch = size[0] if size else BATCH
        # the same rows, warm-up and measured, whatever the batch
        warmup = max(1, args.warmup * BATCH // batch)
        n = warmup + max(1, args.batches * BATCH // batch)
        data = batches(n, keys, share, per, hot, hot_rate, batch=batch)
        runs: dict[str, list[dict]] = {label: [] for label in trackers}
        for i in range(args.rounds):  # the trackers take turns: neither always goes first
            labels = list(trackers) if i % 2 == 0 else list(reversed(trackers))
            for label in labels:
                r = measure(*trackers[label], data, warmup)
                runs[label].append(r)
                print(f"{name:40s} {label:9s} {r}", file=sys.stderr, flush=True)
        for label, rs in runs.items():
            cpu = sorted(r["cpu_us_per_row"] for r in rs)
            r = {**rs[0], "cpu_us_per_row": cpu[len(cpu) // 2], "cpu_us_per_row_runs": cpu}
            results.append({"scenario": name, "tracker": label, **r})
    goal = next(
        (r for r in results if r["tracker"] == "tracker" and r["scenario"] == "1k keys, 1 %"),
        None,
    )
    out = {
        "name": NAME,
        "date": now_iso(),
        "machine": info,
        "argv": argv or [],
        "batch_rows": BATCH,
        "results": results,
        "ratios": []
        if goal is None
        else [
            {
                "name": "incident tracker CPU µs per row (1k keys, 1 % anomalous)",
                "value": goal["cpu_us_per_row"],
                "goal": GOAL_US,
                "met": goal["cpu_us_per_row"] <= GOAL_US,
            }
        ],
    }
    print(
        markdown_table(
            ["scenario", "tracker", "CPU µs/row", "keys with state", "open", "changed/batch"],
            [
                [
                    r["scenario"],
                    r["tracker"],
                    r["cpu_us_per_row"],
                    r["keys_with_state"],
                    r["open_incidents"],
                    r["changed_keys_per_batch"],
                ]
                for r in results
            ],
        )
    )
    if not args.no_write:
        write_results(NAME, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
