"""Every benchmark under tests/bench, one after another, and one table of their ratios.

    .venv/bin/python -m tests.bench.run [NAME ...]      (make bench)

A benchmark is a module here with a `main()` that runs with no arguments, writes
its own results/NAME.json and returns a dict (or nothing: then results/NAME.json
is read). Into the combined table go its "ratios" (a list of {"name", "value",
"goal", "met"}, or a mapping name -> value), or else every row of its "results"
list that has a "ratio..." field, named by its text fields. `gpu` runs only with
`make bench-gpu`.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path

from tests.bench.common import RESULTS_DIR, markdown_table

PACKAGE = "tests.bench"
EXPECTED = ("worker", "penalty")  # named even before they exist, so a missing one shows
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
        rows.append([name, r.get("name", ""), value, goal, {True: "yes", False: "NO"}.get(met, "")])
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


def main(argv: list[str] | None = None) -> int:
    wanted = list(argv if argv is not None else sys.argv[1:]) or discover()
    rows: list[list] = []
    status: list[list] = []
    failed = False
    for name in wanted:
        try:
            module = importlib.import_module(f"{PACKAGE}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{PACKAGE}.{name}":
                raise
            status.append([name, "not present yet", ""])
            continue
        if not callable(getattr(module, "main", None)):
            status.append([name, "no main()", ""])
            continue
        print(f"\n## {name}\n", flush=True)
        t0 = time.monotonic()
        try:
            returned = module.main()
        except SystemExit as e:  # a main() written for the command line
            returned = None
            if e.code not in (0, None):
                failed = True
                status.append([name, f"exit {e.code}", f"{time.monotonic() - t0:.0f}"])
                continue
        except Exception:
            traceback.print_exc()
            failed = True
            status.append([name, "FAILED", f"{time.monotonic() - t0:.0f}"])
            continue
        status.append([name, "ok", f"{time.monotonic() - t0:.0f}"])
        rows += _ratios(name, returned)
    print("\n## Benchmarks\n")
    print(markdown_table(["benchmark", "status", "seconds"], status))
    print()
    print(
        markdown_table(
            ["benchmark", "ratio", "value", "goal", "met"], rows or [["", "(none)", None, None, ""]]
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
