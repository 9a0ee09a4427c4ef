"""GPU benchmark (issue #7): the scoring step and the whole worker, CPU and GPU side by side.

    .venv/bin/python -m tests.bench.gpu                 (make bench-gpu; needs CUDA; ~3-4 min)
    .venv/bin/python -m tests.bench.gpu --cpu-only [--quick] [--no-worker] [--out PATH]

One run, four sections, each written to the results file as soon as it is done (a
run cut short still leaves its figures), with a deadline (--budget-s) that skips
what would not fit:

a. scoring step: score_tensor (tests/bench/_scoring_tools.py) on a device-resident
   float32 batch (CUDA events around R calls; CUDA graphs on and off), and the full
   Scorer.score_batch (host numpy in → host results out, explain="anomalies": what
   the worker pays), rows/s,
   for the default model (D=64) and a larger one (D=512, hidden 1024, code 128), at
   batch sizes 1k..256k (CPU: up to 64k);
b. bf16 vs fp32: score agreement (relative error, Spearman, decisions) and speed;
   CUDA fp32 vs CPU fp32 agreement;
c. GPU memory across 100 reloads as the worker's hot swap does them (the new scorer
   loaded, every bucket captured and golden-checked, while the old one still serves;
   then the old one dropped and its dead graph pools handed back): allocated,
   reserved and graph-pool memory at each step, and how far the scores move;
d. the whole worker (`python -m worker`, WORKER_DEVICE=cpu vs cuda) on the same
   embedded Tansu broker and pre-filled topics, JSON and application/x-float32-rows
   records, throughput = slope of the committed offset (tests/bench/_worker_measure).

Results: tests/bench/results/gpu.json with CUDA; --cpu-only writes
results/gpu-cpu-only.json (not a GPU result: never commit it as gpu.json).

--keep-going records each part's error (exception, message, the project's frame that
raised it) under "errors" in the results and goes on with the next part, instead of
stopping at the first; a refused capture shows as mode "eager" and an error, never
as graphs. tests/bench/gpu_device.sh runs it that way on a lent GPU machine that
has no network (docs/benchmarks.md, "GPU figures").
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from tests.bench.common import REPO, RESULTS_DIR, markdown_table, now_iso

NAME = "gpu"
GOAL_ROWS_PER_S = 20e6  # scoring step, default model, one H100-class GPU
# name -> (input dim, hidden layers); the code is the trainer's default, D/4 (16, 128, 32).
# (TrainConfig(code_dim=...) currently fails in CAEConfig.for_input: code_dim twice.)
MODELS = {"default D=64": (64, ()), "large D=512": (512, (1024,))}
QUICK_MODELS = {"default D=64": (64, ()), "large D=128": (128, (256,))}
ANOMALY_RATE = 0.015

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench.gpu {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- data and models -----------------------------------------------------------------


def make_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Rows near an 8-dimensional subspace (the same for every seed of a dim);
    ANOMALY_RATE of them pushed 6 sd off it in 4 features."""
    mixing = np.random.default_rng(12345 + dim).normal(size=(8, dim)) / np.sqrt(8)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8), dtype=np.float32) @ mixing.astype(np.float32)
    x += 0.3 * rng.standard_normal((n, dim), dtype=np.float32)
    planted = np.flatnonzero(rng.random(n) < ANOMALY_RATE)
    cols = rng.integers(0, dim, size=(len(planted), 4))
    x[planted[:, None], cols] += rng.choice(np.float32([-6.0, 6.0]), size=cols.shape)
    return x


def train_model(model_dir: Path, dim: int, hidden: tuple, quick: bool) -> Path:
    """Train on CPU with the project's trainer; the large model without the penalty
    (its cost does not matter to scoring) and for few epochs."""
    from training.fit import TrainConfig, fit
    from worker.checkpoint import publish

    x = make_rows(500 if quick else 4000, dim, seed=1)
    config = TrainConfig(
        hidden=hidden,
        penalty_weight=0.1 if not hidden else 0.0,
        max_epochs=(2 if quick else 25) if not hidden else (1 if quick else 6),
        patience=5,
        batch_size=128 if not hidden else 256,
        target_fpr=0.01 if quick else 0.002,  # 500 rows (knn: all calibrate) support ≥ 1/501
        seed=0,
    )
    result = fit(x, [f"f{i}" for i in range(dim)], config)
    return model_dir / publish(model_dir, result.model, result.manifest)


# -- timing --------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, min_s: float, max_reps: int = 2000) -> tuple[float, int]:
    """Seconds per call of fn() (already warmed up): one call sizes the repeat count,
    then R calls are timed together (CUDA events on CUDA, the wall clock elsewhere)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = time.perf_counter() - t0
    reps = int(min(max_reps, max(1, math.ceil(min_s / max(one, 1e-6)))))
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / reps, reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps, reps


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# -- machine -------------------------------------------------------------------------


def machine_facts() -> dict:
    try:
        from tests.bench.common import machine

        facts = machine()
    except ImportError as e:  # no kafka client here: the worker section will say so too
        facts = {"cpu_count": os.cpu_count(), "machine_error": str(e)}
    facts["torch"] = torch.__version__
    facts["torch_cuda_build"] = torch.version.cuda
    facts["torch_threads"] = torch.get_num_threads()
    facts["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["gpu"] = {
            "name": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "total_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "device_count": torch.cuda.device_count(),
            "cudnn": torch.backends.cudnn.version(),
        }
    facts["nvidia_smi"] = _nvidia_smi()
    return facts


def _nvidia_smi() -> dict | str:
    query = "name,driver_version,memory.total,power.limit,clocks.max.sm,pcie.link.gen.max"
    try:
        q = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        full = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not available: {e}"
    return {"query": query, "csv": q.stdout.strip(), "output": full.stdout}


# -- the run -------------------------------------------------------------------------


class Run:
    """Results so far, written after every section; the deadline for the rest."""

    def __init__(self, args: argparse.Namespace, out: Path):
        self.args, self.out = args, out
        self.deadline = time.monotonic() + args.budget_s
        self.results: dict = {
            "benchmark": NAME,
            "date": now_iso(),
            "command": "python -m tests.bench.gpu " + " ".join(args.argv),
            "mode": "cpu-only"
            if args.cpu_only
            else ("gpu" if torch.cuda.is_available() else "gpu, but no CUDA found"),
            "complete": False,
            "skipped": {},
        }
        self.models: dict[str, Path] = {}

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, section: str, need_s: float) -> bool:
        if self.left_s() >= need_s:
            return True
        self.results["skipped"][section] = (
            f"time budget: {self.left_s():.0f}s left of --budget-s {self.args.budget_s:.0f}, "
            f"needs ~{need_s:.0f}s"
        )
        log(f"skipping {section}: {self.results['skipped'][section]}")
        return False

    def attempt(self, section: str, device: torch.device, fn, *args) -> None:
        """fn(*args); with --keep-going an exception is recorded under errors[section]
        (type, message, where it was raised) and the run goes on with the next part."""
        try:
            fn(*args)
        except Exception as e:
            if not self.args.keep_going:
                raise
            self.results.setdefault("errors", {})[section] = error_text(e)
            log(f"{section} FAILED: {self.results['errors'][section]}")
            release_quietly(device)
        finally:
            self.save()

    def save(self) -> None:
        self.results["wall_s"] = round(time.monotonic() - _T0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        os.replace(tmp, self.out)


def error_text(e: BaseException) -> str:
    """One line: the exception, its message (first and last line) and the innermost
    frame of this project's own code it passed through."""
    frames = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if str(REPO) in f.filename and "site-packages" not in f.filename
    ]
    where = ""
    if frames:
        f = frames[-1]
        where = f" (at {Path(f.filename).relative_to(REPO)}:{f.lineno} in {f.name})"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    message = lines[0] if lines else ""
    if len(lines) > 1:
        message += f" … {lines[-1]}"
    return f"{type(e).__name__}: {message}{where}"


def release_quietly(device: torch.device) -> None:
    """release() after a failure, which may have broken CUDA itself."""
    try:
        release(device)
    except Exception as e:
        log(f"release after a failure failed too: {error_text(e)}")


def devices(args: argparse.Namespace) -> list[torch.device]:
    return [torch.device("cpu")] + ([] if args.cpu_only else [torch.device("cuda")])


def scoring_section(run: Run, models: dict[str, Path]) -> None:
    """a. rows/s of score_tensor (device-resident) and score_batch (host in/out)."""
    args = run.args
    run.results.setdefault("scoring", [])
    for name, version_dir in models.items():
        if not run.fits(f"scoring {name}", 20):
            continue
        dim = int(name.split("D=")[1])
        sizes = {"cpu": args.cpu_sizes, "cuda": args.gpu_sizes}
        host = make_rows(max(max(s) for s in sizes.values()), dim, seed=2)
        for device in devices(args):
            variants = [("graphs", True)] if device.type == "cuda" else [("eager", False)]
            if device.type == "cuda":
                variants.append(("eager", False))
            for mode, graphs in variants:
                if not run.fits(f"scoring {name} {device} {mode}", 20):
                    continue
                run.attempt(
                    f"scoring {name} {device.type} {mode}",
                    device,
                    _score_variant,
                    *(run, name, version_dir, device, mode, graphs, host),
                )
            run.save()


def _score_variant(run, name, version_dir, device, mode, graphs, host) -> None:
    from tests.bench._scoring_tools import score_tensor
    from worker.checkpoint import read_checkpoint
    from worker.executors import StaticBatchExecutor
    from worker.scoring import Scorer, verify_golden

    args = run.args
    rows_out: list[dict] = run.results["scoring"]
    sizes = {"cpu": args.cpu_sizes, "cuda": args.gpu_sizes}
    scorer = Scorer(read_checkpoint(version_dir), device, cuda_graphs=graphs)
    t0 = time.perf_counter()
    verify_golden(scorer)  # as load_scorer does: builds (captures) and checks every bucket
    golden_s = time.perf_counter() - t0
    for n in sizes[device.type]:
        xd = torch.from_numpy(host[:n]).to(device)
        xh = host[:n]
        calls = {
            "score_tensor": lambda xd=xd, s=scorer: score_tensor(s, xd),
            "score_batch": lambda xh=xh, s=scorer: s.score_batch(xh, explain="anomalies"),
        }
        if mode == "eager" and device.type == "cuda" and name != next(iter(run.models)):
            del calls["score_batch"]  # graphs off: the default model is enough
        for path, fn in calls.items():
            fn()
            fn()  # warm-up: graph capture, pinned buffers, allocator
            per_call, reps = time_calls(fn, device, args.min_time_s)
            executor = scorer.executor
            # what really ran: a refused capture falls back to eager scoring
            replayed = isinstance(executor, StaticBatchExecutor) and executor.replays_graph(
                n, "none" if path == "score_tensor" else "all"
            )
            row = {
                "model": name,
                "device": device.type,
                "mode": "graphs" if replayed else "eager",
                "graphs_requested": graphs,
                "path": path,
                "batch": n,
                "rows_per_s": n / per_call,
                "ms_per_batch": per_call * 1000,
                "reps": reps,
                "golden_check_s": golden_s,
            }
            rows_out.append(row)
            log(
                f"{name} {device.type} {row['mode']} {path} batch {n}: "
                f"{row['rows_per_s'] / 1e6:.2f}M rows/s ({row['ms_per_batch']:.3f} ms)"
            )
            if graphs and not replayed:
                run.results.setdefault("errors", {})[f"scoring {name} {device.type} graphs"] = (
                    "CUDA graphs requested but the batch ran eagerly (capture refused or "
                    "out of memory: see the worker.executors warning in the log)"
                )


def precision_section(run: Run, models: dict[str, Path]) -> None:
    """b. bf16 against fp32 on the fastest device: agreement and speed; CUDA vs CPU fp32."""
    args = run.args
    device = devices(args)[-1]
    out: list[dict] = run.results.setdefault("precision", [])
    n = args.agreement_rows
    for name, version_dir in models.items():
        if not run.fits(f"precision {name}", 20):
            continue
        run.attempt(
            f"precision {name}", device, _precision_model, run, name, version_dir, device, out, n
        )


def _precision_model(run, name, version_dir, device, out, n) -> None:
    from tests.bench._scoring_tools import precision_agreement, score_tensor
    from worker.checkpoint import CheckpointError, read_checkpoint
    from worker.scoring import Scorer, golden_tolerance, load_scorer, verify_golden

    args = run.args
    dim = int(name.split("D=")[1])
    x = make_rows(n, dim, seed=3)
    fp32 = load_scorer(version_dir, device)
    bf16 = Scorer(read_checkpoint(version_dir), device=device, precision="bf16")
    try:
        verify_golden(bf16)
        golden = "pass"
    except CheckpointError as e:
        golden = f"FAIL: {e}"
    g = bf16.manifest.golden
    g_want = np.asarray(g.scores, dtype=np.float64)
    g_got = bf16.score_batch(np.asarray(g.inputs, dtype=np.float32)).scores
    # how much of its tolerance the worst golden row used (> 1 refuses the version)
    golden_used = float(np.max(np.abs(g_got - g_want) / golden_tolerance(device, "bf16", g_want)))
    ref = fp32.score_batch(x, explain="none").scores
    row = {
        "model": name,
        "device": device.type,
        "compared": "bf16 vs fp32",
        "bf16_golden_check": golden,
        "bf16_golden_tolerance_used": golden_used,
        **precision_agreement(ref, bf16.score_batch(x, explain="none").scores, fp32.threshold),
    }
    big = max(args.gpu_sizes if device.type == "cuda" else args.cpu_sizes)
    xd = torch.from_numpy(make_rows(big, dim, seed=4)).to(device)
    for label, s in (("fp32", fp32), ("bf16", bf16)):
        score_tensor(s, xd)
        score_tensor(s, xd)
        per_call, _ = time_calls(lambda s=s, xd=xd: score_tensor(s, xd), device, args.min_time_s)
        row[f"{label}_rows_per_s_at_{big}"] = big / per_call
    row["bf16_speedup"] = row[f"bf16_rows_per_s_at_{big}"] / row[f"fp32_rows_per_s_at_{big}"]
    out.append(row)
    log(
        f"{name} bf16 vs fp32 on {device.type}: max rel err {row['max_rel_error']:.2e}, "
        f"decisions agree {row['decision_agreement']:.5f}, speed x{row['bf16_speedup']:.2f}, "
        f"golden {golden}"
    )
    if device.type == "cuda":
        cpu = load_scorer(version_dir, "cpu").score_batch(x, explain="none").scores
        row = {
            "model": name,
            "device": "cuda vs cpu",
            "compared": "cuda fp32 vs cpu fp32",
            **precision_agreement(cpu, ref, fp32.threshold),
        }
        out.append(row)
        log(f"{name} cuda vs cpu fp32: max rel err {row['max_rel_error']:.2e}")
    fp32 = bf16 = s = xd = None  # every reference, so that their memory goes
    release(device)
    run.save()


def reload_section(run: Run, version_dir: Path) -> None:
    """c. load_scorer N times as the worker's hot swap does: the new scorer is loaded
    (read, verified, every bucket captured and golden-checked) while the old one still
    serves, then the old one is dropped, its dead graph pools handed back
    (release_cached_memory, as Worker._serve does), and the new one scores a batch.
    GPU memory must stay flat and the scores must not move across reloads."""
    args = run.args
    device = devices(args)[-1]
    if not run.fits("reloads", 15 + args.reloads * 0.5):
        return
    run.attempt("reloads", device, _reloads, run, version_dir, device)


def _reloads(run: Run, version_dir: Path, device: torch.device) -> None:
    from worker.executors import gpu_memory, release_cached_memory
    from worker.scoring import load_scorer

    n = run.args.reloads
    cuda = device.type == "cuda"
    x = make_rows(1000, 64, seed=5)
    release(device)
    before = gpu_memory(device, graph_pools=True) if cuda else None
    scorer, memory, load_s, drift = None, [], [], 0.0
    reference = None
    reserve_s = 10 if run.args.no_worker else 140  # the worker section comes next
    for i in range(n):
        if run.left_s() < reserve_s:
            run.results["skipped"]["reloads"] = f"time budget: stopped after {i} reloads"
            break
        t0 = time.perf_counter()
        new = load_scorer(version_dir, device)  # while `scorer` still serves
        load_s.append(time.perf_counter() - t0)
        scorer = new  # the swap: the old scorer's last reference goes here
        del new
        if cuda:
            release_cached_memory()
        scores = scorer.score_batch(x, explain="anomalies").scores
        if reference is None:
            reference = scores
        drift = max(drift, float(np.max(np.abs(scores - reference))))
        if cuda:
            torch.cuda.synchronize(device)
            memory.append(gpu_memory(device, graph_pools=True))
        if (i + 1) % 25 == 0:
            log(f"reload {i + 1}/{n}: {memory[-1] if memory else ''}, max drift {drift:.3g}")
    r: dict = {
        "device": device.type,
        "reloads": len(load_s),
        "load_s_median": float(np.median(load_s)),
        "load_s_first": load_s[0],
        "load_s_max": float(np.max(load_s)),
        "max_abs_score_change_across_reloads": drift,
    }
    if cuda:
        allocated = [m["allocated"] for m in memory]
        reserved = [m["reserved"] for m in memory]
        pools = [m["graph_pools"] for m in memory]
        r.update(
            before=before,
            after_1=memory[0],
            after_10=memory[min(9, len(memory) - 1)],
            after_last=memory[-1],
            allocated_max=max(allocated),
            reserved_max=max(reserved),
            graph_pools_max=max(pools),
            allocated_growth_1_to_last=allocated[-1] - allocated[0],
            reserved_growth_1_to_last=reserved[-1] - reserved[0],
            allocated_every_10=allocated[::10],
            reserved_every_10=reserved[::10],
        )
        del scorer
        release(device)
        r["after_dropping_the_last"] = gpu_memory(device, graph_pools=True)
        r["flat"] = r["allocated_growth_1_to_last"] == 0 and r["reserved_growth_1_to_last"] <= 0
        log(
            f"reloads: {r['after_1']} after 1, {r['after_last']} after {len(memory)}, "
            f"{r['after_dropping_the_last']} after dropping the last"
        )
    else:
        r["memory"] = "no CUDA"
    run.results["reloads"] = r


def worker_section(run: Run, version_dir: Path, tmp: Path) -> None:
    """d. python -m worker on CPU and on CUDA, the same broker and pre-filled topics."""
    args = run.args
    if not run.fits("worker", 60):
        return
    try:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        from deploy.embedded_broker import EmbeddedBroker
        from tests.bench._worker_measure import CLIENTS, Probe, end_offset, run_loop
    except ImportError as e:
        run.results["skipped"]["worker"] = f"cannot import the broker or kafka client: {e}"
        log(f"skipping worker: {e}")
        return
    model_dir = version_dir.parent
    sizes = {"json": args.json_records, "rows": args.rows_records * args.rows_per_record}
    out: dict = run.results.setdefault("worker", {})
    with EmbeddedBroker(log_path=tmp / "tansu.log") as broker:
        bootstrap = broker.bootstrap
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic(f"in-{e}", 1, 1) for e in sizes])
        admin.create_topics([NewTopic(f"in-{e}.dlq", 1, 1) for e in sizes])
        fills = {}
        for i, (enc, n) in enumerate(sizes.items()):
            path = tmp / f"{enc}.npy"
            np.save(path, make_rows(n, 64, seed=10 + i))
            cmd = [*CLIENTS, "fill", bootstrap, str(path), f"in-{enc}", enc]
            fills[enc] = subprocess.Popen(
                [*cmd, str(args.rows_per_record)], stdout=subprocess.PIPE, cwd=REPO
            )
        records = {}
        for enc, proc in fills.items():
            stdout, _ = proc.communicate(timeout=max(30, run.left_s()))
            if proc.returncode:
                raise RuntimeError(f"pre-fill of {enc} failed")
            records[enc] = json.loads(stdout.decode().strip().splitlines()[-1])["records"]
        log(f"pre-filled {records} records")
        out["config"] = {
            "records": records,
            "rows_per_record": args.rows_per_record,
            "settings": "WORKER_MAX_BATCH_WAIT_MS=20, at-least-once, WORKER_MAX_BATCH_SIZE "
            f"1024 records for JSON, {args.rows_batch} records "
            f"({args.rows_batch * args.rows_per_record} vectors) for float32-rows",
            "method": "slope of the committed offset (tests/bench/_worker_measure.run_loop)",
        }
        for enc in sizes:
            for device in devices(args):
                label = f"{enc} {device.type}"
                if not run.fits(f"worker {label}", 45):
                    continue
                group, events = f"{enc}-{device.type}", f"{enc}-{device.type}-events"
                admin.create_topics([NewTopic(events, 1, 1)])
                env = {
                    **os.environ,
                    "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                    "WORKER_INPUT_TOPIC": f"in-{enc}",
                    "WORKER_OUTPUT_TOPIC": events,
                    "WORKER_DLQ_TOPIC": f"in-{enc}.dlq",
                    "WORKER_GROUP_ID": group,
                    # the loops share the input: each its own incident state
                    "WORKER_INCIDENT_TOPIC": f"{group}-incidents",
                    "WORKER_INCIDENT_STATE_TOPIC": f"{group}-incidents-state",
                    "WORKER_MODEL_DIR": str(model_dir),
                    "WORKER_DEVICE": device.type,
                    "WORKER_METRICS_PORT": "0",
                    "WORKER_SESSION_TIMEOUT_MS": "6000",
                    "WORKER_HEARTBEAT_INTERVAL_MS": "1000",
                    "WORKER_WAIT_FOR_MODEL_S": "60",
                    "WORKER_MAX_RECORDS": str(records[enc]),
                    "WORKER_MAX_BATCH_SIZE": str(1024 if enc == "json" else args.rows_batch),
                }
                log(f"worker {label}: {records[enc]} records")
                try:
                    r = run_loop(
                        label.replace(" ", "-"),
                        [sys.executable, "-m", "worker"],
                        env,
                        Probe(admin, group, f"in-{enc}"),
                        records[enc],
                        tmp,
                        broker._proc.pid,
                        timeout_s=min(240, max(30, run.left_s() - 10)),
                    )
                except Exception as e:
                    out[label] = {"error": error_text(e)}
                    run.results.setdefault("errors", {})[f"worker {label}"] = error_text(e)
                    log(f"worker {label} failed: {e}")
                    run.save()
                    continue
                r["events"] = end_offset(bootstrap, events)
                r["vectors_per_s"] = r["records_per_s"] * (
                    args.rows_per_record if enc == "rows" else 1
                )
                r.pop("summary", None)
                out[label] = r
                log(
                    f"worker {label}: {r['records_per_s']:,.0f} records/s, "
                    f"{r['vectors_per_s']:,.0f} vectors/s, {r['events']} events"
                )
                run.save()
        admin.close()


def ratios(results: dict) -> list[dict]:
    from tests.bench.common import ratio

    out = []
    scoring = results.get("scoring", [])

    def best(model, device, mode, path):
        got = [
            r["rows_per_s"]
            for r in scoring
            if (r["model"], r["device"], r["mode"], r["path"]) == (model, device, mode, path)
        ]
        return max(got) if got else None

    default = next(iter(MODELS))
    gpu = best(default, "cuda", "graphs", "score_tensor")
    if gpu is not None:
        out.append(ratio(f"{default}: GPU scoring step, best rows/s ÷ 20M", gpu / 20e6, 1.0, NAME))
    for model in sorted({r["model"] for r in scoring}):
        for path in ("score_tensor", "score_batch"):
            g, c = best(model, "cuda", "graphs", path), best(model, "cpu", "eager", path)
            if g and c:
                out.append(ratio(f"{model}: {path} GPU ÷ CPU, best rows/s", g / c, None, NAME))
    w = results.get("worker", {})
    for enc in ("json", "rows"):
        g, c = w.get(f"{enc} cuda", {}), w.get(f"{enc} cpu", {})
        if "records_per_s" in g and "records_per_s" in c:
            out.append(
                ratio(
                    f"worker {enc}: cuda ÷ cpu records/s",
                    g["records_per_s"] / c["records_per_s"],
                    None,
                    NAME,
                )
            )
    return out


def render(results: dict) -> str:
    m = results["machine"]
    gpu = m.get("gpu", {}).get("name", "no CUDA")
    lines = [
        f"### GPU benchmark ({results['date']}, {results['mode']}, {gpu}, "
        f"{m.get('cpu_count')} CPUs, torch {m['torch']} CUDA {m['torch_cuda_build']})",
        "",
    ]
    scoring = results.get("scoring", [])
    if scoring:
        sizes = sorted({r["batch"] for r in scoring})
        table: dict[tuple, dict] = {}
        for r in scoring:
            table.setdefault((r["model"], r["device"], r["mode"], r["path"]), {})[r["batch"]] = r
        rows = [
            [*key, *[(f"{v[n]['rows_per_s'] / 1e6:.2f}" if n in v else "") for n in sizes]]
            for key, v in table.items()
        ]
        lines += [
            "Scoring, million rows/s by batch size (score_tensor: device-resident input; "
            "score_batch: host numpy in, host results out)",
            "",
            markdown_table(["model", "device", "mode", "call", *map(str, sizes)], rows),
            "",
        ]
    precision = results.get("precision", [])
    if precision:
        lines += [
            markdown_table(
                [
                    "model",
                    "device",
                    "compared",
                    "max rel err",
                    "median rel err",
                    "Spearman",
                    "decisions agree",
                    "flips →anom/→norm",
                    "bf16 speed-up",
                    "bf16 golden",
                ],
                [
                    [
                        p["model"],
                        p["device"],
                        p["compared"],
                        f"{p['max_rel_error']:.2e}",
                        f"{p['median_rel_error']:.2e}",
                        f"{p['spearman']:.6f}",
                        f"{p['decision_agreement']:.5f}",
                        f"{p['flips_to_anomaly']}/{p['flips_to_normal']}",
                        p.get("bf16_speedup"),
                        p.get("bf16_golden_check", ""),
                    ]
                    for p in precision
                ],
            ),
            "",
        ]
    r = results.get("reloads")
    if r:
        lines += [
            markdown_table(["reloads", "value"], [[k, v] for k, v in r.items()]),
            "",
        ]
    w = {k: v for k, v in results.get("worker", {}).items() if k != "config"}
    if w:
        lines += [
            markdown_table(
                [
                    "worker",
                    "records/s",
                    "vectors/s",
                    "events",
                    "startup s",
                    "CPU µs/record",
                    "error",
                ],
                [
                    [
                        k,
                        v.get("records_per_s"),
                        v.get("vectors_per_s"),
                        v.get("events"),
                        v.get("startup_s"),
                        v.get("cpu_us_per_record"),
                        v.get("error", ""),
                    ]
                    for k, v in w.items()
                ],
            ),
            "",
        ]
    if results.get("ratios"):
        lines += [
            markdown_table(
                ["ratio", "value", "goal", "met"],
                [
                    [x["name"], x["value"], x["goal"], {True: "yes", False: "NO"}.get(x["met"], "")]
                    for x in results["ratios"]
                ],
            ),
            "",
        ]
    for section, why in results.get("skipped", {}).items():
        lines.append(f"skipped {section}: {why}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.gpu", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--cpu-only", action="store_true", help="skip every GPU part (no CUDA here)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    p.add_argument("--no-worker", action="store_true", help="skip the worker section (d)")
    p.add_argument("--out", type=Path, help="results file (default results/gpu.json)")
    p.add_argument("--budget-s", type=float, default=320.0, help="skip what would end later")
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="record each part's error in the results and go on (also without CUDA: "
        "the CUDA parts then record why they failed); tests/bench/gpu_device.sh uses it",
    )
    p.add_argument("--logs", type=Path, help="copy the worker and broker logs here at the end")
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.gpu_sizes, args.cpu_sizes = [1024, 4096], [256, 1024]
        args.agreement_rows, args.reloads, args.min_time_s = 1024, 2, 0.01
        args.json_records, args.rows_records, args.rows_per_record = 2000, 400, 16
        args.rows_batch = 8
    else:
        args.gpu_sizes = [1024, 4096, 16384, 65536, 262144]
        args.cpu_sizes = [1024, 16384, 65536]
        args.agreement_rows, args.reloads, args.min_time_s = 65536, 100, 0.25
        args.json_records, args.rows_records, args.rows_per_record = 50_000, 2000, 256
        args.rows_batch = 64  # records: 16k vectors a batch, ~30 batches to time
    if args.out is None:
        args.out = RESULTS_DIR / ("gpu-cpu-only.json" if args.cpu_only else "gpu.json")
    return args


def _sections(run: Run, tmp: Path) -> None:
    args = run.args
    cpu = torch.device("cpu")
    for name, (dim, hidden) in (QUICK_MODELS if args.quick else MODELS).items():
        t0 = time.perf_counter()

        def train(name=name, dim=dim, hidden=hidden):
            run.models[name] = train_model(tmp / name.replace(" ", "-"), dim, hidden, args.quick)

        run.attempt(f"train {name}", cpu, train)
        log(f"trained {name} in {time.perf_counter() - t0:.1f}s")
    models = run.models
    default = models.get(next(iter(QUICK_MODELS if args.quick else MODELS)))
    sections = {
        "scoring": lambda: scoring_section(run, models),
        "precision": lambda: precision_section(run, models),
        "reloads": lambda: reload_section(run, default),
        "worker": lambda: None if args.no_worker else worker_section(run, default, tmp),
    }
    for section, fn in sections.items():
        if default is None and section in ("reloads", "worker"):
            run.results["skipped"][section] = "the default model failed to train"
            continue
        run.attempt(section, devices(args)[-1], fn)
        run.results["ratios"] = ratios(run.results)
        run.save()


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.cpu_only and not torch.cuda.is_available() and not args.keep_going:
        sys.exit(
            f"error: no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}): run with --cpu-only to measure the CPU side only"
        )
    run = Run(args, args.out)
    run.results["machine"] = machine_facts()
    run.results["config"] = {
        "models": {
            k: {"dim": d, "hidden": h, "code": d // 4}
            for k, (d, h) in (QUICK_MODELS if args.quick else MODELS).items()
        },
        "gpu_sizes": [] if args.cpu_only else args.gpu_sizes,
        "cpu_sizes": args.cpu_sizes,
        "min_time_s": args.min_time_s,
        "timing": "score_tensor: CUDA events around R calls after 2 warm-up calls (CPU: wall clock); "
        "score_batch: the same, each call ends in a synchronize",
    }
    if args.cpu_only:
        run.results["skipped"]["gpu"] = "no CUDA (--cpu-only)"
    elif not torch.cuda.is_available():
        run.results["errors"] = {"cuda": "no CUDA device: every CUDA part below fails"}
    log(f"{run.results['machine'].get('gpu', {}).get('name', 'no CUDA')}; results to {args.out}")
    run.save()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        try:
            _sections(run, tmp)
        finally:
            if args.logs:  # the loops' and the broker's logs, before tmp goes
                args.logs.mkdir(parents=True, exist_ok=True)
                for path in tmp.glob("*.log"):
                    shutil.copy(path, args.logs / path.name)
    if args.no_worker:
        run.results["skipped"]["worker"] = "--no-worker"
    run.results["complete"] = True
    run.results["ratios"] = ratios(run.results)
    run.save()
    print(render(run.results))
    log(f"wrote {args.out}")
    return run.results


if __name__ == "__main__":
    main()
