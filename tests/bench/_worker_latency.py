"""The latency part of the worker benchmark alone (`python -m tests.bench.worker --latency-only`).

One embedded broker, one model; end-to-end latency (tests/bench/_worker_measure.py
`measure_latency`) of `python -m worker` at a fixed rate per format, for each
variant, in rounds that alternate the variants (the order of a run is not a cause):

* worker           this checkout, the benchmark's defaults (incidents on)
* worker+env       the same with --worker-env KEY=VALUE added (A/B)
* baseline         `python -m worker` of --baseline-repo (another checkout, e.g. a
                   `git archive` of an older commit), with a model its own trainer made

The rate defaults to what the last full run offered (half the WORKER_EMIT=all capacity
in tests/bench/results/worker.json). --latency-prefill N first fills N records per
format into topics of their own, so the broker holds what a full run's broker holds
when its latency part starts. Results: tests/bench/results/worker-latency.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from deploy.embedded_broker import EmbeddedBroker
from tests.bench._worker_measure import CLIENTS, log, measure_latency, worker_env
from tests.bench.common import REPO, RESULTS_DIR, markdown_table

FORMATS = ("json", "float32")


def default_rates() -> dict[str, float]:
    """Half the WORKER_EMIT=all capacity of the last full run, per format."""
    try:
        last = json.loads((RESULTS_DIR / "worker.json").read_text())
        return {
            enc: round(last["throughput"][enc]["worker, emit=all"]["records_per_s"] / 2)
            for enc in FORMATS
        }
    except (OSError, KeyError, ValueError):
        return {"json": 5000, "float32": 5000}


def parse_rates(text: str) -> dict[str, float]:
    rates = default_rates()
    for part in filter(None, (p.strip() for p in text.split(","))):
        enc, value = part.split("=", 1)
        if enc not in FORMATS:
            raise SystemExit(f"--latency-rate: unknown format {enc!r} (json, float32)")
        rates[enc] = float(value)
    return rates


def train_baseline(repo: str, model_dir: Path, seed: int) -> None:
    """A model made by the baseline checkout's own trainer (its checkpoint format and
    default score)."""
    code = (
        "from pathlib import Path; from tests.bench.worker import train; "
        f"train(Path({str(model_dir)!r}), {seed})"
    )
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)


def run_latency_only(args, tmp: Path, train, make_data) -> dict:
    rates = parse_rates(args.latency_rate)
    formats = [f for f in args.latency_formats.split(",") if f]
    extra_env = dict(kv.split("=", 1) for kv in args.worker_env)
    variants: dict[str, tuple[Path, dict, str | None]] = {"worker": (tmp / "models", {}, None)}
    if extra_env:
        variants["worker+env"] = (tmp / "models", extra_env, None)
    if args.baseline_repo:
        variants["baseline"] = (tmp / "models-baseline", {}, args.baseline_repo)
    data = {}
    for i, enc in enumerate(formats):
        x, _ = make_data(20_000, args.seed + 10 + i)
        data[enc] = tmp / f"{enc}.npy"
        np.save(data[enc], x)
    train(tmp / "models", args.seed, args.score)
    if args.baseline_repo:
        train_baseline(args.baseline_repo, tmp / "models-baseline", args.seed)
    out: dict = {"rates": rates, "variants": list(variants), "runs": []}
    with EmbeddedBroker(log_path=tmp / "tansu.log") as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            if args.latency_prefill:
                _prefill(broker.bootstrap, admin, make_data, args.latency_prefill, tmp, args.seed)
            for rnd in range(args.latency_rounds):
                for enc in formats:
                    for name, (model_dir, extra, repo) in variants.items():
                        label = f"{name.replace('+', '-')}-r{rnd}"
                        ctx = _ctx(broker, admin, model_dir, tmp)
                        log(f"latency {enc} {name} round {rnd}: {rates[enc]:.0f} records/s")
                        r = measure_latency(
                            ctx,
                            enc,
                            data[enc],
                            rates[enc],
                            args.latency_s,
                            label,
                            extra,
                            cwd=repo,
                        )
                        r.update(variant=name, round=rnd)
                        out["runs"].append(r)
                        log(
                            f"latency {enc} {name} round {rnd}: p50 {r['p50_ms']:.0f} ms, "
                            f"p99 {r['p99_ms']:.0f} ms, {r['records_per_batch']:.0f} records/batch, "
                            f"cpu {r['cpu_cores']}"
                        )
        finally:
            admin.close()
    return out


def _ctx(broker: EmbeddedBroker, admin: KafkaAdminClient, model_dir: Path, tmp: Path) -> dict:
    def env(topic, out, group, max_records, emit):
        return worker_env(broker.bootstrap, model_dir, topic, out, group, max_records, emit)

    return {
        "bootstrap": broker.bootstrap,
        "create": lambda topics: admin.create_topics([NewTopic(t, 1, 1) for t in topics]),
        "env": env,
        "logdir": tmp,
        "broker_pid": broker._proc.pid,
    }


def _prefill(bootstrap: str, admin, make_data, n: int, tmp: Path, seed: int) -> None:
    for i, enc in enumerate(FORMATS):
        x, _ = make_data(n, seed + 30 + i)
        path = tmp / f"fill-{enc}.npy"
        np.save(path, x)
        admin.create_topics([NewTopic(f"fill-{enc}", 1, 1)])
        log(f"pre-filling {n} {enc} records")
        subprocess.run(
            [*CLIENTS, "fill", bootstrap, str(path), f"fill-{enc}", enc],
            cwd=REPO,
            check=True,
            capture_output=True,
        )


def render_latency_only(results: dict) -> str:
    rows = [
        [
            r["encoding"],
            r["variant"],
            r["round"],
            r["achieved_rate"],
            r.get("p50_ms"),
            r.get("p99_ms"),
            f"{r['split']['input_to_detected'].get('p50_ms', 0):.0f} / "
            f"{r['split']['input_to_detected'].get('p99_ms', 0):.0f}",
            r["records_per_batch"],
            " ".join(f"{k} {v:.2f}" for k, v in r["cpu_cores"].items()),
        ]
        for r in results["runs"]
    ]
    head = ["format", "variant", "round", "rate/s", "p50 ms", "p99 ms", "send→detected p50 / p99"]
    return markdown_table([*head, "records/batch", "CPU cores"], rows)
