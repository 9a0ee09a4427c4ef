"""Worker throughput, scale, memory and latency against the embedded broker (issues #3, #7).

    .venv/bin/python -m tests.bench.worker [--json-records N] [--float32-records N] ...

One run, one embedded Tansu broker, 64-float records with ~1.5% planted anomalies.
For JSON (a 2-partition topic) and for application/x-float32 records (1 partition)
it measures, each over the same pre-filled topic (one consumer group per loop):

* worker       `python -m worker` (a subprocess, WORKER_MAX_RECORDS bounds it), defaults
               (WORKER_TORCH_THREADS=1, WORKER_EMIT=anomalies)
* 2 workers    (JSON) two `python -m worker` in one group, one partition each: the
               rate while both partitions still have records, after the last rebalance
* worker, emit=all  the worker publishing one event per record: the capacity that
               the latency run offers half of
* worker, incidents off  the worker with WORKER_INCIDENT_TOPIC=none: beside `worker`
               (incidents on, the default), the cost of per-entity incidents
* passthrough  the same client settings, micro-batching, codec, event builder and
               publish path with no model, flagging as many rows as the model: the ceiling
* naive        per record: poll one, decode, score a 1-row batch, send, flush, commit

Throughput is the slope of the group's committed offsets, sampled every 50 ms, from
the second commit seen to the last before the final drain (start-up, group join, the
first commit's wait for the coordinator and the drain excluded: `_timed_window`). CPU
is the loop processes' user+system time over that same window. The worker and the
passthrough run in --rounds rounds (default 3) that take turns, and each rate is the
median of its rounds; the other loops run once. The worker's resident
memory (VmRSS, /proc/PID/status) is sampled alongside, after a 1 s warm-up. Then,
for the multi-row format (application/x-float32-rows), the worker's and the
passthrough's vectors/s; and end-to-end latency: a producer process sends at half
the worker's measured WORKER_EMIT=all throughput for --latency-s seconds, the worker
runs with WORKER_EMIT=all, and this process reads every event, latency = arrival
here - the input record's timestamp (set at send).

Then the same loops behind a delayed link (tests/bench/_worker_delay.py): at 0, 1
and 5 ms each way (--delay-ms), the worker in both delivery modes against the
pipelined passthrough as the ceiling, over a float32 topic on a broker of its own;
per delay and mode the end-to-end latency at half the WORKER_EMIT=all capacity and
what the loop adds over the passthrough's latency at the same rate (bound: one
WORKER_MAX_BATCH_WAIT_MS plus one round trip; under exactly-once plus the commit
interval and the transaction end's two round trips); at 0 ms the passthrough without the
proxy, to show that the proxy is not the bottleneck.
--delay-only runs just that part (trains its own model); --baseline-repo PATH adds
`python -m worker` from another checkout to it.

--worker-env KEY=VALUE adds an A/B loop "worker+env" (not in the standard run).
--loops "worker;worker, incidents off;passthrough" runs only those loops (JSON and
float32), prints their table and ratios, and skips the rest.

--latency-only runs just the end-to-end latency (tests/bench/_worker_latency.py): the
worker, --worker-env and --baseline-repo variants in alternating rounds at a fixed rate.

--shadow-only runs just the drift and shadow CPU loops (tests/bench/_worker_shadow.py):
the worker with drift off, with defaults, and with a candidate in shadow, over JSON and
float32 topics, --shadow-rounds times; results: tests/bench/results/worker-shadow.json.

Results: tests/bench/results/worker.json and markdown tables on stderr/stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from deploy.embedded_broker import EmbeddedBroker
from tests.bench._worker_delay import delay_ratios, run_delayed
from tests.bench._worker_measure import (
    CLIENTS,
    SAMPLE_S,
    Probe,
    end_offsets,
    log,
    measure_latency,
    median_run,
    rounds_order,
    run_group,
    worker_env,
)
from tests.bench.common import REPO, machine, markdown_table, now_iso, ratio, write_results

NAME = "worker"
DIM = 64
ANOMALY_RATE = 0.015
GOALS = {
    "worker/passthrough": 0.8,
    "worker/naive": 20.0,
    "rows_vectors_per_s": 500_000.0,
    "rss_mb": 500.0,  # at most, on CPU
}
# The JSON topic has two partitions, so one and two workers read the same records.
PARTITIONS = {"in-json": 2}


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows near an 8-dimensional subspace; ANOMALY_RATE of them pushed 6 sd off it in 4 features."""
    mixing = np.random.default_rng(12345).normal(size=(8, DIM)) / np.sqrt(8)  # one subspace for all
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)) @ mixing + 0.3 * rng.normal(size=(n, DIM))
    planted = rng.random(n) < ANOMALY_RATE
    for i in np.flatnonzero(planted):
        cols = rng.choice(DIM, 4, replace=False)
        x[i, cols] += rng.choice([-6.0, 6.0], 4)
    return x.astype(np.float32), planted


def train(model_dir: Path, seed: int, score: str | None = None) -> float:
    """A small CAE on normal rows; returns its threshold's target false-positive rate.
    `score`: the checkpoint's score kind (default: the trainer's, knn)."""
    import torch

    from training.fit import TrainConfig, fit
    from worker.checkpoint import publish

    torch.set_num_threads(1)  # the pre-fill producers run beside it on the same cores
    x, planted = make_data(4000, seed + 1)
    config = TrainConfig(max_epochs=25, patience=5, target_fpr=0.002, seed=seed)
    if score is not None:
        config = TrainConfig.model_validate({**config.model_dump(), "score": score})
    result = fit(x[~planted], [f"f{i}" for i in range(DIM)], config)
    publish(model_dir, result.model, result.manifest)
    return config.target_fpr


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.worker", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--json-records", type=int, default=150_000)
    p.add_argument("--float32-records", type=int, default=150_000)
    p.add_argument("--naive-records", type=int, default=2_000)
    p.add_argument(
        "--emit-all-records",
        type=int,
        default=50_000,
        help="records for the WORKER_EMIT=all capacity runs (the first of the topic)",
    )
    p.add_argument("--rows-records", type=int, default=2_000)
    p.add_argument("--rows-per-record", type=int, default=256)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the worker and passthrough loops (throughput, and behind the "
        "delayed link), taking turns; each rate is the median",
    )
    p.add_argument("--latency-s", type=float, default=12.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--score",
        choices=["knn", "mae", "mse"],
        default=None,
        help="the model's score kind (default: the trainer's default, knn)",
    )
    p.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the worker and passthrough loops of each format (no naive, 2 workers, "
        "emit=all, latency or delayed link): the cost of scoring, A/B with --score",
    )
    p.add_argument(
        "--delay-ms",
        default="0,1,5",
        help="one-way delays of the delayed-link loops, comma-separated ('' skips them)",
    )
    p.add_argument("--delay-records", type=int, default=100_000)
    p.add_argument("--delay-only", action="store_true", help="only the delayed-link loops")
    p.add_argument(
        "--shadow-only",
        action="store_true",
        help="only the CPU loops of drift off / defaults / a candidate in shadow",
    )
    p.add_argument("--shadow-rounds", type=int, default=3)
    p.add_argument(
        "--latency-only",
        action="store_true",
        help="only the end-to-end latency (tests/bench/_worker_latency.py): the worker, "
        "+ --worker-env, + --baseline-repo, in alternating rounds",
    )
    p.add_argument(
        "--latency-rate",
        default="",
        help="records/s per format for --latency-only, e.g. json=5683,float32=6258 "
        "(default: half the emit=all capacity in results/worker.json)",
    )
    p.add_argument("--latency-formats", default="json,float32")
    p.add_argument("--latency-rounds", type=int, default=1)
    p.add_argument(
        "--delay-latency-rounds",
        type=int,
        default=3,
        help="rounds of the latency behind the delayed link, taking turns; medians reported",
    )
    p.add_argument(
        "--delay-latency-share",
        type=float,
        default=0.5,
        help="the share of each mode's emit=all capacity behind the delayed link at which "
        "its latency is measured",
    )
    p.add_argument(
        "--latency-prefill",
        type=int,
        default=0,
        help="records per format the broker holds before --latency-only measures",
    )
    p.add_argument("--baseline-repo", help="also run python -m worker from this checkout")
    p.add_argument(
        "--baseline-first", action="store_true", help="time the baseline loops first (order check)"
    )
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also time the worker with this extra environment (A/B), as loop 'worker+env'",
    )
    p.add_argument(
        "--loops",
        default="",
        help="only these loops of the JSON and float32 topics, ';'-separated (e.g. "
        "'worker;worker, incidents off;passthrough'); no latency, rows or delay runs",
    )
    p.add_argument(
        "--no-write", action="store_true", help="print the table, leave results/worker.json alone"
    )
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.delay_latency_rounds < 1:
        p.error("--delay-latency-rounds must be at least 1")
    if not 0 < args.delay_latency_share <= 1:
        p.error("--delay-latency-share must be in (0, 1]")
    small = [f for f in ("json", "float32", "rows") if getattr(args, f"{f}_records") < 1]
    if small:
        p.error(f"--{small[0]}-records must be at least 1: every format's topic is filled")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args([] if argv is None else argv)
    started = time.monotonic()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        tmp = Path(tmp)
        results = {}
        if args.shadow_only:
            return _shadow_only(args, argv, info, started, tmp)
        if args.latency_only:
            return _latency_only(args, argv, info, started, tmp)
        if not args.delay_only:
            with EmbeddedBroker(log_path=tmp / "tansu.log") as broker:
                results = _run(args, broker, tmp)
        if args.delay_ms and not args.loops:
            results.update(_delayed(args, tmp))
    results = {
        "benchmark": NAME,
        "date": now_iso(),
        "command": "python -m tests.bench.worker " + " ".join(argv or []),
        "machine": {**info, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "wall_s": round(time.monotonic() - started, 1),
        **results,
    }
    if not args.no_write:  # before rendering: a rendering bug must not lose a run
        suffix = "-delay" if args.delay_only else "-loops" if args.loops else ""
        log(f"wrote {write_results(NAME + suffix, results)}")
    print(render_loops(results) if args.loops else render(results))
    return results


def _shadow_only(args, argv, info: dict, started: float, tmp: Path) -> dict:
    from tests.bench._worker_shadow import run_shadow_loops

    with EmbeddedBroker(log_path=tmp / "tansu.log") as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            loops = run_shadow_loops(args, broker, admin, tmp, train, make_data)
        finally:
            admin.close()
    results = {
        "benchmark": NAME + "-shadow",
        "date": now_iso(),
        "command": "python -m tests.bench.worker " + " ".join(argv or []),
        "machine": {**info, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "wall_s": round(time.monotonic() - started, 1),
        **loops,
    }
    if not args.no_write:
        log(f"wrote {write_results(NAME + '-shadow', results)}")
    rows = [[enc, *m.values()] for enc, m in loops["cpu_us_per_record_median"].items()]
    print(markdown_table(["topic", *next(iter(loops["cpu_us_per_record_median"].values()))], rows))
    print(
        markdown_table(
            ["ratio", "value", "goal", "met"],
            [[r["name"], r["value"], r["goal"], r["met"]] for r in loops["ratios"]],
        )
    )
    return results


def _latency_only(args, argv, info: dict, started: float, tmp: Path) -> dict:
    from tests.bench._worker_latency import render_latency_only, run_latency_only

    runs = run_latency_only(args, tmp, train, make_data)
    results = {
        "benchmark": NAME + "-latency",
        "date": now_iso(),
        "command": "python -m tests.bench.worker " + " ".join(argv or []),
        "machine": {**info, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "wall_s": round(time.monotonic() - started, 1),
        "config": {
            "score": args.score or "default (knn)",
            "latency_s": args.latency_s,
            "worker_env_ab": args.worker_env,
            "baseline_repo": args.baseline_repo,
            "prefill": args.latency_prefill,
        },
        **runs,
    }
    if not args.no_write:
        log(f"wrote {write_results(NAME + '-latency', results)}")
    print(render_latency_only(results))
    return results


def _delayed(args: argparse.Namespace, tmp: Path) -> dict:
    """The delayed-link loops; the model of the main run, or one trained here."""
    from worker.checkpoint import read_latest
    from worker.scoring import load_scorer

    model_dir = tmp / "models"
    if not model_dir.exists():
        train(model_dir, args.seed, args.score)
    x, _ = make_data(args.delay_records, args.seed + 20)
    np.save(tmp / "delay.npy", x)
    scorer = load_scorer(model_dir / read_latest(model_dir), device="cpu")
    flagged = scorer.score_batch(x).is_anomaly.mean()
    threshold = float(np.quantile(np.abs(x).max(axis=1), 1 - flagged))
    delays = [float(d) for d in args.delay_ms.split(",")]
    delayed = run_delayed(
        delays,
        tmp / "delay.npy",
        model_dir,
        threshold,
        tmp,
        args.baseline_repo,
        latency_s=args.latency_s or None,
        baseline_first=args.baseline_first,
        latency_rounds=args.delay_latency_rounds,
        latency_share=args.delay_latency_share,
        rounds=args.rounds,
    )
    ratios = [ratio(name, value, None, NAME) for name, value in delay_ratios(delayed)]
    return {"delayed": delayed, "delay_ratios": ratios}


def _run(args: argparse.Namespace, broker: EmbeddedBroker, tmp: Path) -> dict:
    bootstrap = broker.bootstrap
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    model_dir = tmp / "models"

    def create(topics: list[str]) -> None:
        admin.create_topics([NewTopic(t, PARTITIONS.get(t, 1), 1) for t in topics])

    def env(
        topic: str, out: str, group: str, max_records: int | None, emit: str = "anomalies"
    ) -> dict:
        return worker_env(bootstrap, model_dir, topic, out, group, max_records, emit)

    ctx = {"bootstrap": bootstrap, "create": create, "env": env, "logdir": tmp}
    sizes = {
        "json": args.json_records,
        "float32": args.float32_records,
        "rows": args.rows_records * args.rows_per_record,
    }
    data: dict[str, Path] = {}
    flagged_rows: dict[str, np.ndarray] = {}
    for i, (enc, n) in enumerate(sizes.items()):
        x, _ = make_data(n, args.seed + 10 + i)
        data[enc] = tmp / f"{enc}.npy"
        np.save(data[enc], x)
    create([f"in-{enc}" for enc in sizes] + [f"in-{enc}.dlq" for enc in sizes])

    log(f"pre-filling {sizes} (rows: {args.rows_per_record} rows/record) while the model trains")
    fills = {
        enc: subprocess.Popen(
            [
                *CLIENTS,
                "fill",
                bootstrap,
                str(data[enc]),
                f"in-{enc}",
                enc,
                str(args.rows_per_record),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        for enc in sizes
    }
    target_fpr = train(model_dir, args.seed, args.score)
    fill_stats = {}
    for enc, proc in fills.items():
        out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"pre-fill of {enc} failed")
        fill_stats[enc] = json.loads(out.decode().strip().splitlines()[-1])
    log(f"pre-filled: { {k: round(v['records_per_s']) for k, v in fill_stats.items()} } records/s")

    # The passthrough flags rows by max |x|, at the quantile that flags as many rows as the model.
    from worker.checkpoint import read_latest
    from worker.scoring import load_scorer

    scorer = load_scorer(model_dir / read_latest(model_dir), device="cpu")
    thresholds = {}
    for enc in sizes:
        x = np.load(data[enc])
        flagged_rows[enc] = scorer.score_batch(x).is_anomaly
        thresholds[enc] = float(np.quantile(np.abs(x).max(axis=1), 1 - flagged_rows[enc].mean()))
    del scorer

    probe_for = lambda group, topic: Probe(admin, group, topic, PARTITIONS.get(topic, 1))  # noqa: E731
    throughput: dict[str, dict] = {}
    extra_env = dict(kv.split("=", 1) for kv in args.worker_env)
    ab = ["worker+env"] if extra_env else []
    # Side by side on the same pre-filled topic; "worker, emit=all" is the capacity the
    # latency run offers half of; "2 workers" share the JSON topic's two partitions.
    off = "worker, incidents off"
    loops = [
        ("json", ["worker", off, "2 workers", *ab, "worker, emit=all", "passthrough", "naive"]),
        ("float32", ["worker", off, *ab, "worker, emit=all", "passthrough", "naive"]),
        ("rows", ["worker", *ab, "passthrough"]),
    ]
    if args.throughput_only:
        loops = [(enc, ["worker", *ab, "passthrough"]) for enc, _ in loops]
    if args.loops:
        only = [k.strip() for k in args.loops.split(";")]
        loops = [(enc, [k for k in kinds if k in only]) for enc, kinds in loops[:2]]

    def run_kind(enc: str, kind: str, ends: tuple, suffix: str = "") -> dict:
        topic = f"in-{enc}"
        n = fill_stats[enc]["records"]
        if kind == "naive":
            n = min(n, args.naive_records)
        elif kind.endswith("emit=all"):
            n = min(n, args.emit_all_records)
        slug = (
            kind.replace(", ", "-").replace("=", "-").replace(" ", "-").replace("+", "-") + suffix
        )
        group, out = f"{enc}-{slug}", f"{enc}-{slug}-events"
        create([out, f"{group}-incidents"])
        admin.create_topics([NewTopic(f"{group}-incidents-state", PARTITIONS.get(topic, 1), 1)])
        workers = 2 if kind == "2 workers" else 1
        loop_env = env(
            topic,
            out,
            group,
            None if workers > 1 else n,
            emit="all" if kind.endswith("emit=all") else "anomalies",
        )
        if kind == "worker+env":
            loop_env.update(extra_env)
        if kind == off:
            loop_env["WORKER_INCIDENT_TOPIC"] = "none"
        cmd = (
            [*CLIENTS, "passthrough", str(thresholds[enc])]
            if kind == "passthrough"
            else [*CLIENTS, "naive"]
            if kind == "naive"
            else [sys.executable, "-m", "worker"]
        )
        log(f"{enc} {kind}{suffix}: {n} records")
        r = run_group(
            f"{enc}-{slug}",
            [(cmd, loop_env)] * workers,
            probe_for(group, topic),
            n,
            tmp,
            broker._proc.pid,
            stop_when_committed=workers > 1,
            ends=ends if len(ends) > 1 and kind in ("worker", "2 workers") else None,
        )
        r["outputs"] = sum(end_offsets(bootstrap, out))
        # incident state written (changelog records, markers included)
        r["changelog_records"] = sum(
            end_offsets(bootstrap, f"{group}-incidents-state", PARTITIONS.get(topic, 1))
        )
        if enc == "rows":
            r["vectors_per_s"] = r["records_per_s"] * args.rows_per_record
        busy = r.get("all_busy", {}).get("records_per_s")
        log(
            f"{enc} {kind}{suffix}: {r['records_per_s']:,.0f} records/s"
            + (f" ({busy:,.0f}/s with every partition busy)" if busy else "")
            + f", {r['outputs']} events, {r['cpu_us_per_record']:.1f} us cpu/record, "
            f"started in {r['startup_s']} s, rss {r['memory'].get('steady_rss_mb')} MB"
        )
        return r

    # the worker against its ceiling in rounds that take turns; the other loops once
    paired = ["worker", *ab, "passthrough"]
    for enc, kinds in loops:
        topic = f"in-{enc}"
        ends = end_offsets(bootstrap, topic, PARTITIONS.get(topic, 1))
        throughput[enc] = {}
        rounds = [k for k in kinds if k in paired]
        runs: dict[str, list[dict]] = {k: [] for k in rounds}
        for kind in kinds:
            if kind not in paired:
                throughput[enc][kind] = run_kind(enc, kind, ends)
        for i, kind in rounds_order(rounds, args.rounds):
            runs[kind].append(run_kind(enc, kind, ends, f"-r{i}" if args.rounds > 1 else ""))
        for kind in rounds:
            throughput[enc][kind] = median_run(runs[kind])

    if args.loops:
        admin.close()
        return {
            "config": {"loops": only, "model_target_fpr": target_fpr},
            "throughput": throughput,
            "ratios": _incident_ratios(throughput),
        }
    latency = {}
    variants = {"worker": {}, **({"worker+env": extra_env} if extra_env else {})}
    for enc in () if args.throughput_only else ("json", "float32"):
        # Every record's event is needed, so the worker runs with WORKER_EMIT=all: offer
        # half of what it sustains that way (not half of the anomalies-only rate).
        rate = round(throughput[enc]["worker, emit=all"]["records_per_s"] / 2)
        for label, extra in variants.items():
            log(f"latency {enc} {label}: {rate} records/s for {args.latency_s}s, WORKER_EMIT=all")
            r = measure_latency(
                ctx, enc, data[enc], rate, args.latency_s, label.replace("+", "-"), extra
            )
            latency[f"{enc} {label}"] = r
            log(
                f"latency {enc} {label}: p50 {r.get('p50_ms', float('nan')):.1f} ms, p99 {r.get('p99_ms', float('nan')):.1f} ms"
            )

    ratios = []
    for enc in ("json", "float32"):
        t = throughput[enc]
        w = t["worker"]["records_per_s"]
        if args.throughput_only:
            ratios.append(
                ratio(
                    f"{enc}: worker / passthrough",
                    w / t["passthrough"]["records_per_s"],
                    GOALS["worker/passthrough"],
                    NAME,
                )
            )
            continue
        ratios.append(
            ratio(
                f"{enc}: worker / passthrough",
                w / t["passthrough"]["records_per_s"],
                GOALS["worker/passthrough"],
                NAME,
            )
        )
        ratios.append(
            ratio(
                f"{enc}: worker / naive",
                w / t["naive"]["records_per_s"],
                GOALS["worker/naive"],
                NAME,
            )
        )
    for enc in sizes:
        t = throughput[enc]
        ratios.append(
            ratio(
                f"{enc}: worker / passthrough, by CPU per record (passthrough µs ÷ worker µs)",
                t["passthrough"]["cpu_us_per_record"] / t["worker"]["cpu_us_per_record"],
                None,
                NAME,
            )
        )
    rows_vps = throughput["rows"]["worker"]["vectors_per_s"]
    ratios.append(
        ratio(
            "float32-rows: worker / passthrough",
            rows_vps / throughput["rows"]["passthrough"]["vectors_per_s"],
            GOALS["worker/passthrough"],
            NAME,
        )
    )
    ratios.append(
        ratio(
            "vectors/s: batched (float32-rows) / single records (float32)",
            rows_vps / throughput["float32"]["worker"]["records_per_s"],
            None,
            NAME,
        )
    )
    ratios.append(
        ratio(
            "float32-rows: worker vectors/s / 500k",
            rows_vps / GOALS["rows_vectors_per_s"],
            1.0,
            NAME,
        )
    )
    one, two = throughput["json"]["worker"], throughput["json"].get("2 workers")
    if two is None:  # --throughput-only
        return _results(
            args,
            sizes,
            target_fpr,
            flagged_rows,
            extra_env,
            fill_stats,
            throughput,
            latency,
            ratios,
            admin,
        )
    busy1, busy2 = one["all_busy"]["records_per_s"], two["all_busy"]["records_per_s"]
    ratios.append(
        ratio(
            "json: 2 workers / 1 worker (every partition busy)",
            busy2 / busy1 if busy1 and busy2 else None,
            None,
            NAME,
        )
    )
    ratios.append(
        ratio(
            "json: 2 workers / 1 worker (whole run, first commit to last)",
            two["records_per_s"] / one["records_per_s"],
            None,
            NAME,
        )
    )
    ratios += _incident_ratios(throughput)
    if extra_env:
        for enc in sizes:
            t = throughput[enc]
            ratios.append(
                ratio(
                    f"A/B {enc}: worker+env / passthrough ({' '.join(args.worker_env)})",
                    t["worker+env"]["records_per_s"] / t["passthrough"]["records_per_s"],
                    GOALS["worker/passthrough"],
                    NAME,
                )
            )
    return _results(
        args,
        sizes,
        target_fpr,
        flagged_rows,
        extra_env,
        fill_stats,
        throughput,
        latency,
        ratios,
        admin,
    )


def _results(
    args, sizes, target_fpr, flagged_rows, extra_env, fill_stats, throughput, latency, ratios, admin
) -> dict:
    admin.close()
    return {
        "config": {
            "broker": "embedded Tansu (memory storage), loopback",
            "input_partitions": {f"in-{enc}": PARTITIONS.get(f"in-{enc}", 1) for enc in sizes},
            "dim": DIM,
            "planted_anomaly_rate": ANOMALY_RATE,
            "model_target_fpr": target_fpr,
            "model_score": args.score or "default (knn)",
            "model_flagged_fraction": {k: float(v.mean()) for k, v in flagged_rows.items()},
            "rows_per_record": args.rows_per_record,
            "worker_env_ab": extra_env,
            "worker_settings": "defaults: WORKER_MAX_BATCH_SIZE=4096, WORKER_MAX_BATCH_BYTES=64 MiB, WORKER_MAX_BATCH_WAIT_MS=20, at-least-once, device cpu",
            "throughput_method": f"slope of the committed offset sampled every {SAMPLE_S * 1000:.0f} ms, first commit to last",
            "latency_method": (
                "arrival at a test consumer (fetch_max_wait_ms=10) minus the input record's CreateTime "
                "(set at send); WORKER_EMIT=all; steady producer (linger_ms=5, acks=all) at half the "
                "worker's throughput with WORKER_EMIT=all (measured in the same run), so the worker is "
                "not saturated and the figure is not a queueing delay. Tansu answers a fetch at "
                "fetch_max_wait_ms rather than when data arrives; the worker bounds its fetch wait "
                "by WORKER_MAX_BATCH_WAIT_MS (20 ms)"
            ),
        },
        "prefill": fill_stats,
        "throughput": throughput,
        "latency": latency,
        "ratios": ratios,
    }


def _incident_ratios(throughput: dict) -> list[dict]:
    """The cost of incidents: the worker with them (the default) beside the worker without
    and the passthrough ceiling."""
    out = []
    for enc in ("json", "float32"):
        t = throughput.get(enc, {})
        on, off, ceiling = (
            t.get(k, {}).get("records_per_s")
            for k in ("worker", "worker, incidents off", "passthrough")
        )
        if on and off:
            out.append(ratio(f"{enc}: worker, incidents on / off", on / off, None, NAME))
        if on and ceiling:
            out.append(
                ratio(
                    f"{enc}: worker (incidents on) / passthrough",
                    on / ceiling,
                    GOALS["worker/passthrough"],
                    NAME,
                )
            )
        if off and ceiling:
            out.append(
                ratio(f"{enc}: worker, incidents off / passthrough", off / ceiling, None, NAME)
            )
    return out


def render_loops(results: dict) -> str:
    rows = [
        [
            enc,
            kind,
            r["records"],
            r["records_per_s"],
            r["outputs"],
            r.get("changelog_records", ""),
            r["cpu_us_per_record"],
        ]
        for enc, loops in results["throughput"].items()
        for kind, r in loops.items()
    ]
    table = markdown_table(
        ["format", "loop", "records", "records/s", "events", "changelog records", "CPU µs/record"],
        rows,
    )
    ratios = markdown_table(
        ["ratio", "value", "goal"],
        [[r["name"], r["value"], r.get("goal")] for r in results["ratios"]],
    )
    return table + "\n\n" + ratios


def _rounds_note(added: dict) -> str:
    """ ", median of N rounds (each: …)" for a latency measured in rounds."""
    rounds = added.get("rounds_p50_ms", [])
    if len(rounds) < 2:
        return ""
    return f"; median of {len(rounds)} rounds ({', '.join(f'{v:.0f}' for v in rounds)})"


def render_delayed(results: dict) -> str:
    rows = [
        [
            f"{delay} ms",
            kind,
            r["records"],
            r["records_per_s"],
            r["records_per_s"] / loops["passthrough"]["records_per_s"],
            r["cpu_us_per_record"],
        ]
        for delay, loops in results["delayed"].items()
        for kind, r in loops.items()
        if kind not in ("latency", "proxy_check")
    ]
    head = ["delay each way", "loop (float32, 1 partition)", "records", "records/s"]
    out = markdown_table([*head, "/ passthrough", "CPU µs/record"], rows)
    lat = [
        [
            f"{delay} ms",
            mode,
            r["target_rate"],
            r.get("p50_ms"),
            r.get("p99_ms"),
            r.get("loop_added", {}).get("p50_ms", ""),
            r.get("loop_added", {}).get("p99_ms", ""),
            r.get("loop_added", {}).get("bound_ms", ""),
        ]
        for delay, loops in results["delayed"].items()
        for mode, r in loops.get("latency", {}).items()
    ]
    for delay, loops in results["delayed"].items():
        check = loops.get("proxy_check")
        if check:
            runs = check["records_per_s"]
            out += (
                f"\n\nproxy check at {delay} ms (alternating runs, records/s): through the "
                f"proxy {', '.join(f'{r:,.0f}' for r in runs['passthrough'])}; without it "
                f"{', '.join(f'{r:,.0f}' for r in runs['passthrough, no proxy'])}; "
                f"ratio of medians {check['through_proxy_over_without']:.2f}"
            )
    if lat:
        head = ["delay each way", "latency of", "records/s offered", "p50 ms", "p99 ms"]
        head += [
            "loop adds, p50 ms",
            "p99 ms",
            "bound ms (batch wait + round trip [+ commit interval + 2 round trips])",
        ]
        out += "\n\n" + markdown_table(head, lat)
    return out


def render(results: dict) -> str:
    if "throughput" not in results:
        return render_delayed(results)
    t = results["throughput"]
    rows = []
    for enc, label in (("json", "JSON"), ("float32", "float32"), ("rows", "float32-rows")):
        for kind, r in t[enc].items():
            rate = r["records_per_s"]
            rows.append(
                [
                    label,
                    kind,
                    r["records"],
                    rate,
                    r.get("vectors_per_s", rate),
                    r["outputs"],
                    r["cpu_cores"],
                    r["cpu_us_per_record"],
                    r["broker_cpu_cores"],
                    r.get("memory", {}).get("steady_rss_mb"),
                    r.get("memory", {}).get("peak_rss_mb"),
                ]
            )
    scale = [
        [
            kind,
            r["processes"],
            r["all_busy"].get("records_per_s"),
            r["all_busy"].get("seconds"),
            r["all_busy"].get("cpu_us_per_record"),
            r["records_per_s"],
            r["cpu_us_per_record"],
            " / ".join(",".join(a[-1]) if a else "-" for a in r["assignments"]),
            len(r["assignments"][0]) if r["assignments"] else 0,
        ]
        for kind, r in t["json"].items()
        if "all_busy" in r
    ]
    out = [
        f"### Worker benchmark ({results['date']}, {results['machine']['cpu_count']} CPUs, "
        f"load {results['machine']['load_avg_1m_at_start']}→{results['machine']['load_avg_1m_at_end']}, "
        f"kafka crc32c: {results['machine']['kafka_crc32c']})",
        "",
        markdown_table(
            [
                "format",
                "loop",
                "records",
                "records/s",
                "vectors/s",
                "events",
                "loop CPU (cores)",
                "CPU µs/record",
                "broker CPU (cores)",
                "RSS steady MB",
                "RSS peak MB",
            ],
            rows,
        ),
        "",
        markdown_table(
            [
                "JSON, 2 partitions",
                "processes",
                "records/s, every partition busy",
                "over s",
                "CPU µs/record",
                "records/s, first commit to last",
                "CPU µs/record",
                "last assignment per worker",
                "assignments seen (worker 0)",
            ],
            scale,
        ),
        "",
        markdown_table(
            ["ratio", "value", "goal", "met"],
            [
                [r["name"], r["value"], r["goal"], {True: "yes", False: "NO"}.get(r["met"], "")]
                for r in results["ratios"]
            ],
        ),
        "",
        markdown_table(
            [
                "latency (WORKER_EMIT=all)",
                "rate/s",
                "events",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "send→detected p50 / p99",
                "detected→arrival p50 / p99",
            ],
            [
                [
                    k,
                    v["achieved_rate"],
                    v["events_received"],
                    v.get("p50_ms"),
                    v.get("p90_ms"),
                    v.get("p99_ms"),
                    v.get("max_ms"),
                    _p50_p99(v["split"]["input_to_detected"]),
                    _p50_p99(v["split"]["detected_to_arrival"]),
                ]
                for k, v in results["latency"].items()
            ],
        ),
    ]
    if "delayed" in results:
        out += ["", render_delayed(results)]
    return "\n".join(out)


def _p50_p99(summary: dict) -> str:
    if not summary.get("count"):
        return ""
    return f"{summary['p50_ms']:.0f} / {summary['p99_ms']:.0f}"


if __name__ == "__main__":
    main(sys.argv[1:])


def summary_rows(results: dict) -> list[dict]:
    """Key figures for the one table of `python -m tests.bench.run`: figure, value, goal
    (text), met, and what was measured side by side (rates with CPU µs per record)."""
    if "throughput" not in results:  # a --delay-only run
        return _delay_rows(results)
    t, lat = results["throughput"], results["latency"]
    by_name = {r["name"]: r for r in results["ratios"]}

    def rate(r: dict, unit: str = "rec/s", key: str = "records_per_s") -> str:
        return f"{r[key]:,.0f} {unit} ({r['cpu_us_per_record']:.0f} µs CPU/rec)"

    def row(figure, value, goal=None, met=None, detail=""):
        return {"figure": figure, "value": value, "goal": goal, "met": met, "detail": detail}

    out = []
    for enc, label in (("json", "JSON"), ("float32", "float32")):
        w, pt, nv = t[enc]["worker"], t[enc]["passthrough"], t[enc]["naive"]
        r = by_name[f"{enc}: worker / passthrough"]
        out.append(
            row(
                f"{label}: worker / passthrough",
                r["value"],
                f"≥ {r['goal']}",
                r["met"],
                f"{rate(w)} vs {rate(pt)}" + _rounds_ratio_note(w, pt),
            )
        )
    r = by_name["float32-rows: worker / passthrough"]
    w, pt = t["rows"]["worker"], t["rows"]["passthrough"]
    rpr = results["config"]["rows_per_record"]
    out.append(
        row(
            f"float32-rows ({rpr} rows/record): worker / passthrough",
            r["value"],
            f"≥ {r['goal']}",
            r["met"],
            f"{w['vectors_per_s']:,.0f} vs {pt['vectors_per_s']:,.0f} vectors/s "
            f"({w['cpu_us_per_record'] / rpr:.1f} vs {pt['cpu_us_per_record'] / rpr:.1f} µs CPU/vector)"
            + _rounds_ratio_note(w, pt),
        )
    )
    for enc, label in (("json", "JSON"), ("float32", "float32")):
        w, nv = t[enc]["worker"], t[enc]["naive"]
        r = by_name[f"{enc}: worker / naive"]
        out.append(
            row(
                f"{label}: worker / naive per-record loop",
                r["value"],
                f"≥ {r['goal']}",
                r["met"],
                f"{rate(w)} vs {rate(nv)}",
            )
        )
    f32 = t["float32"]["worker"]
    r = by_name["vectors/s: batched (float32-rows) / single records (float32)"]
    out.append(
        row(
            "batched (float32-rows) / single float32 records, vectors/s",
            r["value"],
            "",
            None,
            f"{t['rows']['worker']['vectors_per_s']:,.0f} vs {f32['records_per_s']:,.0f} vectors/s "
            f"({t['rows']['worker']['cpu_us_per_record'] / rpr:.1f} vs "
            f"{f32['cpu_us_per_record']:.0f} µs CPU/vector); goal 500k vectors/s: "
            f"{'met' if by_name['float32-rows: worker vectors/s / 500k']['met'] else 'not met'}",
        )
    )
    one, two = t["json"]["worker"], t["json"]["2 workers"]
    r = by_name["json: 2 workers / 1 worker (every partition busy)"]
    b1, b2 = one["all_busy"], two["all_busy"]
    out.append(
        row(
            "JSON: 2 workers / 1 worker, one group, 2 partitions, 2 cores",
            r["value"],
            "",
            None,
            (
                f"{b2['records_per_s']:,.0f} vs {b1['records_per_s']:,.0f} rec/s with every "
                f"partition busy ({b2['cpu_us_per_record']:.0f} vs {b1['cpu_us_per_record']:.0f} "
                f"µs CPU/rec, both workers' CPU); whole run incl. rebalance "
                f"{two['records_per_s'] / one['records_per_s']:.2f}×"
                if r["value"] is not None
                else "no window with both partitions busy after the last rebalance"
            ),
        )
    )
    mem = one["memory"]
    out.append(
        row(
            "worker RSS, steady / peak (JSON throughput run)",
            f"{mem.get('steady_rss_mb')} / {mem.get('peak_rss_mb')} MB",
            f"≤ {GOALS['rss_mb']:.0f} MB",
            None if mem.get("peak_rss_mb") is None else mem["peak_rss_mb"] <= GOALS["rss_mb"],
            f"VmRSS every 50 ms after warm-up, {mem.get('samples')} samples; "
            f"VmHWM incl. start-up {mem.get('lifetime_peak_rss_mb')} MB",
        )
    )
    for enc, label in (("json", "JSON"), ("float32", "float32")):
        v = lat.get(f"{enc} worker")
        if not v:
            continue
        cap = t[enc]["worker, emit=all"]
        d = v["split"]["input_to_detected"]
        out.append(
            row(
                f"{label}: end-to-end latency p50 / p99",
                f"{v.get('p50_ms', float('nan')):.0f} / {v.get('p99_ms', float('nan')):.0f} ms",
                "",
                None,
                f"at {v['achieved_rate']:,.0f} rec/s = half the WORKER_EMIT=all capacity "
                f"({cap['records_per_s']:,.0f} rec/s, {cap['cpu_us_per_record']:.0f} µs CPU/rec); "
                f"send→detected p50 / p99 {d.get('p50_ms', 0):.0f} / {d.get('p99_ms', 0):.0f} ms",
            )
        )
    return out + _delay_rows(results)


def _rounds_ratio_note(w: dict, pt: dict) -> str:
    """The per-round ratios behind a ratio of medians, when the loops ran in rounds."""
    if len(w.get("rounds", ())) < 2:
        return ""
    each = ", ".join(f"{a / b:.2f}" for a, b in zip(w["rounds"], pt["rounds"], strict=True))
    return f"; medians of {len(w['rounds'])} rounds taking turns, per round {each}"


def _delay_rows(results: dict) -> list[dict]:
    """Per delay and delivery mode: the worker against the passthrough of the same run;
    what the loop adds to the latency; the proxy check at 0 ms."""
    from tests.bench._worker_delay import NO_PROXY

    out = []
    for delay, loops in results.get("delayed", {}).items():
        ceiling = loops["passthrough"]
        for kind in ("worker, at-least-once", "worker, exactly-once"):
            r = loops[kind]
            out.append(
                {
                    "figure": f"delay {delay} ms each way: {kind} / passthrough",
                    "value": r["records_per_s"] / ceiling["records_per_s"],
                    "goal": "",
                    "met": None,
                    "detail": f"{r['records_per_s']:,.0f} vs {ceiling['records_per_s']:,.0f} "
                    "rec/s (float32, 1 partition, pipelined passthrough)"
                    + _rounds_ratio_note(r, ceiling),
                }
            )
        for mode, r in loops.get("latency", {}).items():
            added = r.get("loop_added")
            if not added:
                continue
            out.append(
                {
                    "figure": f"delay {delay} ms each way: latency the {mode} loop adds, p50 ms",
                    "value": added["p50_ms"],
                    "goal": f"≤ {added['bound_ms']:g}",
                    "met": added["within_bound_p50"],
                    "detail": f"p50/p99 {r['p50_ms']:.0f}/{r['p99_ms']:.0f} ms at "
                    f"{r['target_rate']:,} rec/s, passthrough "
                    f"{loops['latency']['passthrough']['p50_ms']:.0f}/"
                    f"{loops['latency']['passthrough']['p99_ms']:.0f} ms" + _rounds_note(added),
                }
            )
        check = loops.get("proxy_check")
        if check:
            m = check["medians"]
            out.append(
                {
                    "figure": f"delay {delay} ms: passthrough through the proxy / without it "
                    f"(medians of {len(check['records_per_s']['passthrough'])} alternating runs)",
                    "value": check["through_proxy_over_without"],
                    "goal": "≈ 1",
                    "met": None,
                    "detail": f"{m['passthrough']:,.0f} vs {m[NO_PROXY]:,.0f} rec/s",
                }
            )
        if NO_PROXY in loops:
            direct = loops[NO_PROXY]["records_per_s"]
            out.append(
                {
                    "figure": f"delay {delay} ms: passthrough through the proxy / without it",
                    "value": ceiling["records_per_s"] / direct,
                    "goal": "≈ 1",
                    "met": None,
                    "detail": f"{ceiling['records_per_s']:,.0f} vs {direct:,.0f} rec/s",
                }
            )
    return out
