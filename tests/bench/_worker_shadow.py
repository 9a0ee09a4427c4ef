"""The CPU cost of drift monitoring and of a candidate in shadow (issue #13), for
`python -m tests.bench.worker --shadow-only`.

Over the same pre-filled topics (JSON, 2 partitions; float32, 1 partition), rounds of
three loops, each `python -m worker` in a consumer group of its own, bounded by
WORKER_MAX_RECORDS:

* worker, drift off   WORKER_DRIFT_WINDOW=0 (what the worker did before drift)
* worker              defaults: drift on, no candidate pending
* worker, shadow      a second checkpoint in shadow from before the first record to the
                      last (WORKER_SHADOW_RECORDS far above the run: never decided)

CPU per record is the loop process's user+system time over the timed window (first
commit to last, tests/bench/_worker_measure.run_group). The shadow loop runs
`python -m tests.bench._worker_shadow CANDIDATE_DIR`: the worker itself, plus one
thread that publishes the candidate into WORKER_MODEL_DIR once the first model serves.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from tests.bench._worker_measure import CLIENTS, Probe, end_offsets, log, run_group
from tests.bench.common import REPO, ratio

KINDS = ("worker, drift off", "worker", "worker, shadow")
# CPU per record with a candidate in shadow at most 1.15 × the worker's: as a ratio that
# meets its goal from above (tests/bench/common.ratio), worker / shadow ≥ 1 / 1.15.
GOALS = {"worker/shadow": 1 / 1.15}


def serve_with_candidate(candidate_dir: Path) -> int:
    """`python -m worker`, and the candidate published once the first model serves."""
    from worker.checkpoint import LATEST_FILE, read_latest
    from worker.logs import configure_logging
    from worker.service import Worker
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    configure_logging(settings.log_level)
    worker = Worker(settings)
    signal.signal(signal.SIGTERM, worker.request_stop)
    version = read_latest(candidate_dir)

    def publish_candidate() -> None:
        while worker.scorer is None and not worker.stopping:
            time.sleep(0.01)
        shutil.copytree(candidate_dir / version, settings.model_dir / version)
        tmp = settings.model_dir / ".LATEST.candidate.tmp"
        tmp.write_text(version + "\n")
        os.replace(tmp, settings.model_dir / LATEST_FILE)

    threading.Thread(target=publish_candidate, daemon=True).start()
    worker.run()
    return 0


def run_shadow_loops(args, broker, admin, tmp: Path, train, make_data) -> dict:
    bootstrap = broker.bootstrap
    from kafka.admin import NewTopic

    first, candidate = tmp / "models-first", tmp / "models-candidate"
    partitions = {"in-json": 2, "in-float32": 1}
    sizes = {"json": args.json_records, "float32": args.float32_records}
    admin.create_topics([NewTopic(t, n, 1) for t, n in partitions.items()])
    admin.create_topics([NewTopic(f"{t}.dlq", 1, 1) for t in partitions])
    fills = {}
    for i, (enc, n) in enumerate(sizes.items()):
        x, _ = make_data(n, args.seed + 10 + i)
        np.save(tmp / f"{enc}.npy", x)
        fills[enc] = subprocess.Popen(
            [*CLIENTS, "fill", bootstrap, str(tmp / f"{enc}.npy"), f"in-{enc}", enc],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
    train(first, args.seed)
    train(candidate, args.seed + 1)
    for enc, proc in fills.items():
        proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"pre-fill of {enc} failed")

    def env(enc: str, group: str, model_dir: Path, extra: dict) -> dict:
        e = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
        e.update(
            KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            WORKER_INPUT_TOPIC=f"in-{enc}",
            WORKER_OUTPUT_TOPIC=f"{group}-events",
            WORKER_DLQ_TOPIC=f"in-{enc}.dlq",
            WORKER_INCIDENT_TOPIC="none",
            WORKER_GROUP_ID=group,
            WORKER_MODEL_DIR=str(model_dir),
            WORKER_DEVICE="cpu",
            WORKER_METRICS_PORT="0",
            WORKER_SESSION_TIMEOUT_MS="6000",
            WORKER_HEARTBEAT_INTERVAL_MS="1000",
            WORKER_WAIT_FOR_MODEL_S="60",
            WORKER_MAX_RECORDS=str(
                sum(end_offsets(bootstrap, f"in-{enc}", partitions[f"in-{enc}"]))
            ),
            **extra,
        )
        return e

    runs: dict[str, dict[str, list[dict]]] = {enc: {k: [] for k in KINDS} for enc in sizes}
    for r in range(args.shadow_rounds):
        for enc in sizes:
            topic = f"in-{enc}"
            n = sum(end_offsets(bootstrap, topic, partitions[topic]))
            for kind in KINDS:
                group = f"{enc}-{kind.replace(', ', '-').replace(' ', '-')}-{r}"
                model_dir = tmp / group
                shutil.copytree(first, model_dir)
                cmd = [sys.executable, "-m", "worker"]
                extra = {}
                if kind == "worker, drift off":
                    extra["WORKER_DRIFT_WINDOW"] = "0"
                elif kind == "worker, shadow":
                    extra = {"WORKER_SHADOW_RECORDS": str(10**12), "WORKER_RELOAD_POLL_S": "0.05"}
                    cmd = [sys.executable, "-m", "tests.bench._worker_shadow", str(candidate)]
                res = run_group(
                    group,
                    [(cmd, env(enc, group, model_dir, extra))],
                    Probe(admin, group, topic, partitions[topic]),
                    n,
                    tmp,
                    broker._proc.pid,
                )
                if kind == "worker, shadow":
                    text = (tmp / f"{group}.log").read_text()
                    if "shadow_started" not in text or "shadow_promoted" in text:
                        raise RuntimeError(f"{group}: the candidate was not in shadow throughout")
                log(
                    f"round {r} {enc} {kind}: {res['records_per_s']:,.0f} records/s, "
                    f"{res['cpu_us_per_record']:.1f} us cpu/record"
                )
                runs[enc][kind].append(
                    {
                        k: res[k]
                        for k in ("records", "seconds", "records_per_s", "cpu_us_per_record")
                    }
                )

    ratios = []
    summary = {}
    for enc in sizes:
        med = {k: float(np.median([x["cpu_us_per_record"] for x in runs[enc][k]])) for k in KINDS}
        summary[enc] = {k: round(v, 2) for k, v in med.items()}
        ratios.append(
            ratio(
                f"{enc}: CPU per record, worker / worker with drift off (median of rounds)",
                med["worker"] / med["worker, drift off"],
                None,
                "worker-shadow",
            )
        )
        ratios.append(
            ratio(
                f"{enc}: CPU per record, worker / worker with a candidate in shadow (median)",
                med["worker"] / med["worker, shadow"],
                GOALS["worker/shadow"],
                "worker-shadow",
            )
        )
    return {"shadow_runs": runs, "cpu_us_per_record_median": summary, "ratios": ratios}


if __name__ == "__main__":
    sys.exit(serve_with_candidate(Path(sys.argv[1])))
