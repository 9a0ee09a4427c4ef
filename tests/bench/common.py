"""Shared pieces of the benchmarks: machine facts, result files, markdown tables."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def crc32c_implementation() -> str:
    """Which CRC-32C kafka-python uses to check fetched record batches.

    The pure-Python fallback costs ~5x in consumer throughput (ENVIRONMENT.md).
    """
    from kafka.record import util

    impl = util.calc_crc32c.__defaults__[0]
    native = util.crc32c_c is not None and impl is util.crc32c_c
    return f"{impl.__module__}.{impl.__name__} ({'C' if native else 'pure Python'})"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "kafka-python": _version("kafka-python"),
        "crc32c": _version("crc32c"),
        "orjson": _version("orjson"),
        "kafka_crc32c": crc32c_implementation(),
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_results(name: str, results: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(name: str, value: float | None, goal: float | None, benchmark: str) -> dict:
    """One line of the combined table that `python -m tests.bench.run` prints."""
    met = None if value is None or goal is None else value >= goal
    return {"benchmark": benchmark, "name": name, "value": value, "goal": goal, "met": met}
