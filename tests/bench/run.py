"""Every benchmark under tests/bench, one after another, and one table of key figures.

    .venv/bin/python -m tests.bench.run [NAME ...]      (make bench)

A benchmark is a module here with a `main()` that runs with no arguments, writes
its own results/NAME.json and returns a dict (or nothing: then results/NAME.json
is read). Each prints its own detailed tables while it runs; at the end comes ONE
markdown table with the date and the machine, written to results/summary.md and into
docs/benchmarks.md between its two marker comments (a full run only):

* worker: its `summary_rows(results)` (ratios with the rates and CPU µs per record
  they come from, 2 workers / 1, resident memory, latency);
* penalty: closed / plain and estimate / plain training-step time (default model);
* CPU vs GPU: the ratios of results/gpu.json when it exists (`make bench-gpu` writes
  it on a CUDA machine; it is not run here), else "no GPU on this machine";
* any other benchmark: its "ratios" (a list of {"name", "value", "goal", "met"}, or
  a mapping name -> value), or else every row of its "results" list that has a
  "ratio..." field, named by its text fields.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path

from tests.bench.common import RESULTS_DIR, machine, markdown_table, now_iso

PACKAGE = "tests.bench"
# Named even before they exist, so a missing one shows. The penalty benchmark (one
# process, no broker) goes first: after the worker benchmark the load its broker and
# producers left behind (load 2.2 on 2 cores) swung the closed/plain ratio to 1.5×.
EXPECTED = ("penalty", "worker")
NOT_BENCHMARKS = {"run", "common", "gpu"}


def discover() -> list[str]:
    here = Path(__file__).resolve().parent
    found = {m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_")}
    found -= NOT_BENCHMARKS
    return [*EXPECTED, *sorted(found - set(EXPECTED))]


def _ratios(name: str, returned) -> list[dict]:
    results = returned if isinstance(returned, dict) else None
    if results is None and (RESULTS_DIR / f"{name}.json").exists():
        results = json.loads((RESULTS_DIR / f"{name}.json").read_text())
    results = results or {}
    raw = results.get("ratios") or []
    if isinstance(raw, dict):
        raw = [{"name": k, "value": v} for k, v in raw.items()]
    if not raw and isinstance(results.get("results"), list):
        raw = [_ratio_row(r) for r in results["results"] if isinstance(r, dict)]
    rows = []
    for r in filter(None, raw):
        value, goal, met = r.get("value"), r.get("goal"), r.get("met")
        numbers = isinstance(value, int | float) and isinstance(goal, int | float)
        if met is None and numbers:
            met = value >= goal
        if numbers and met is not None and met != (value >= goal):
            goal = f"≤ {goal}"  # met although below the goal: lower is better
        elif isinstance(goal, int | float):
            goal = f"≥ {goal}"
        rows.append([name, r.get("name", ""), value, goal, met])
    return rows


def _ratio_row(row: dict) -> dict | None:
    key = next((k for k in row if k.startswith("ratio")), None)
    if key is None:
        return None
    label = " ".join(str(v) for k, v in row.items() if isinstance(v, str))
    return {
        "name": f"{label} {key}",
        "value": row[key],
        "goal": row.get("goal"),
        "met": row.get("met"),
    }


def _load(name: str, returned) -> dict:
    if isinstance(returned, dict):
        return returned
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _generic_rows(name: str, returned) -> list[dict]:
    return [
        {"figure": f"{name}: {r[1]}", "value": r[2], "goal": r[3], "met": r[4], "detail": ""}
        for r in _ratios(name, returned)
    ]


def _penalty_rows(results: dict) -> list[dict]:
    """closed / plain and estimate / plain for the default model at batch 256 (its goals)."""
    rows = {
        (r.get("architecture"), r.get("batch"), r.get("mode")): r
        for r in results.get("results", [])
        if isinstance(r, dict)
    }
    plain = rows.get(("default", 256, "plain"))
    out = []
    for mode in ("closed", "estimate"):
        r = rows.get(("default", 256, mode))
        if r is None or plain is None:
            continue
        large = rows.get(("default", 1024, mode))
        detail = (
            f"{r['ms_per_step']:.2f} vs {plain['ms_per_step']:.2f} ms/step, batch 256, "
            f"interleaved; CPU-time ratio {r['cpu_time_ratio_to_plain']:.2f}×"
        )
        if large:
            detail += f"; batch 1024: {large['ratio_to_plain']:.2f}×"
        goal = r.get("goal")
        out.append(
            {
                "figure": f"training step, penalty {mode} / plain (λ = 0)",
                "value": r["ratio_to_plain"],
                "goal": None if goal is None else f"≤ {goal}",
                "met": r.get("met"),
                "detail": detail + f" (results/penalty.json, {results.get('date', '?')})",
            }
        )
    return out


def _gpu_rows() -> list[dict]:
    path = RESULTS_DIR / "gpu.json"
    if not path.exists():
        return [
            {
                "figure": "CPU vs GPU",
                "value": "no GPU on this machine",
                "goal": None,
                "met": None,
                "detail": "make bench-gpu on a CUDA machine writes results/gpu.json",
            }
        ]
    results = json.loads(path.read_text())
    where = results.get("machine", {})
    device = where.get("gpu") or where.get("cuda_device") or where.get("device") or "GPU"
    rows = _generic_rows("CPU vs GPU", results)
    for r in rows:
        r["detail"] = f"results/gpu.json, {results.get('date', '?')}, {device}"
    return rows or [
        {
            "figure": "CPU vs GPU",
            "value": "results/gpu.json has no ratios",
            "goal": None,
            "met": None,
            "detail": "",
        }
    ]


def summary_table(rows: list[dict]) -> str:
    return markdown_table(
        ["figure", "value", "goal", "met", "measured side by side"],
        [
            [
                r["figure"],
                r["value"],
                r["goal"],
                {True: "yes", False: "NO"}.get(r["met"], ""),
                r["detail"],
            ]
            for r in rows
        ],
    )


def main(argv: list[str] | None = None) -> int:
    given = list(argv if argv is not None else sys.argv[1:])
    wanted = given or discover()
    facts = machine()
    started = time.monotonic()
    date = now_iso()
    rows: list[dict] = []
    status: list[str] = []
    failed = False
    for name in wanted:
        try:
            module = importlib.import_module(f"{PACKAGE}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{PACKAGE}.{name}":
                raise
            status.append(f"{name} not present yet")
            continue
        if not callable(getattr(module, "main", None)):
            status.append(f"{name} has no main()")
            continue
        print(f"\n## {name}\n", flush=True)
        t0 = time.monotonic()
        try:
            returned = module.main()
        except SystemExit as e:  # a main() written for the command line
            returned = None
            if e.code not in (0, None):
                failed = True
                status.append(f"{name} exit {e.code} after {time.monotonic() - t0:.0f} s")
                rows.append(
                    {
                        "figure": name,
                        "value": f"exit {e.code}",
                        "goal": None,
                        "met": False,
                        "detail": "",
                    }
                )
                continue
        except Exception:
            traceback.print_exc()
            failed = True
            status.append(f"{name} FAILED after {time.monotonic() - t0:.0f} s")
            rows.append(
                {"figure": name, "value": "FAILED", "goal": None, "met": False, "detail": ""}
            )
            continue
        status.append(f"{name} {time.monotonic() - t0:.0f} s")
        try:
            if name == "penalty":
                rows += _penalty_rows(_load(name, returned)) or _generic_rows(name, returned)
            elif callable(getattr(module, "summary_rows", None)):
                rows += module.summary_rows(_load(name, returned))
            else:
                rows += _generic_rows(name, returned)
        except Exception:  # a summary bug must not lose the other rows
            traceback.print_exc()
            failed = True
            rows += _generic_rows(name, returned)
    rows += _gpu_rows()
    load_end = round(os.getloadavg()[0], 2)
    text = "\n".join(
        [
            f"### Benchmarks, {date}",
            "",
            f"{facts['cpu_count']} CPUs ({facts['processor']}, {facts['platform']}), "
            f"Python {facts['python']}, torch {facts['torch']}, kafka-python "
            f"{facts['kafka-python']} with {facts['kafka_crc32c']}; load (1 min) "
            f"{facts['load_avg_1m_at_start']} at start, {load_end} at end; "
            f"{time.monotonic() - started:.0f} s: {', '.join(status)}. "
            "Command: `.venv/bin/python -m tests.bench.run` (make bench).",
            "",
            summary_table(rows),
        ]
    )
    print("\n## Summary\n")
    print(text, flush=True)
    if not given or set(given) >= set(EXPECTED):  # a partial run leaves the summaries alone
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / "summary.md").write_text(text + "\n")
        write_docs_summary(text)
        print(f"\nwrote {RESULTS_DIR / 'summary.md'} and {DOCS_FILE}")
    return 1 if failed else 0


# docs/benchmarks.md holds the latest full run between these two markers; the prose
# around them is written by hand and left as it is.
DOCS_FILE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
DOCS_START = "<!-- make bench: generated table, start -->"
DOCS_END = "<!-- make bench: generated table, end -->"


def write_docs_summary(text: str, path: Path = DOCS_FILE) -> None:
    """Replace the generated section of docs/benchmarks.md (appended when absent)."""
    block = f"{DOCS_START}\n\n{text}\n\n{DOCS_END}"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = doc.find(DOCS_START), doc.find(DOCS_END)
    if 0 <= start < end:
        doc = doc[:start] + block + doc[end + len(DOCS_END) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


if __name__ == "__main__":
    sys.exit(main())
