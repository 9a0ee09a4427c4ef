"""Where the worker's CPU goes, per step of its loop: thread CPU time of the steps
below, summed over the run and appended as one line of JSON to $CPU_SPLIT_OUT when the
worker exits. Not part of the product; loaded only through PYTHONPATH:

    .venv/bin/python -m tests.bench.worker --delay-ms '' --json-records 20000 \\
        --float32-records 100000 --rows-records 10 --loops "worker+env" \\
        --worker-env PYTHONPATH=tests/bench/cpu_split --worker-env CPU_SPLIT_OUT=/tmp/split.jsonl

Each JSON line: {"process_cpu_s": ..., "<step>": [cpu_s, calls], ...}, one line per
worker run (the JSON loop's, then the float32 loop's). The wrapping costs ~1 µs a call,
a few calls a batch. Garbage collections are timed too, per generation (they run inside
whichever step allocated, so they are also part of that step's time), from the process's
start: start-up's full collections, before the worker freezes what survived (each
walks 50 000 – 200 000 objects), are in them; the loop's walk ~10 000. Steps are patched
once the worker's modules have loaded (a thread watches for them), before the loop's
first batch.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import threading
import time

OUT = os.environ.get("CPU_SPLIT_OUT")
_acc: dict[str, list] = {}


def _timed(f, label: str):
    def timed(*args, **kwargs):
        t = time.thread_time()
        try:
            return f(*args, **kwargs)
        finally:
            a = _acc.setdefault(label, [0.0, 0])
            a[0] += time.thread_time() - t
            a[1] += 1

    return timed


def _patch() -> None:
    m = sys.modules
    step, service = m["worker.step"], m["worker.service"]
    for name in ("rows_of", "changelog_records", "build_events", "next_offsets"):
        setattr(step, name, _timed(getattr(step, name), name))
    service.score_records = _timed(step.score_records, "score_records (all of the above)")
    m["worker.scoring"].Scorer.score_batch = _timed(
        m["worker.scoring"].Scorer.score_batch, "score_batch"
    )
    m["worker.codec"].Codec.decode = _timed(m["worker.codec"].Codec.decode, "decode")
    tracker = m["worker.incidents"].IncidentTracker
    tracker.observe = _timed(tracker.observe, "incident tracker observe")
    for cls in vars(m["worker.delivery"]).values():
        if isinstance(cls, type) and cls.__module__ == "worker.delivery":
            for meth in ("submit", "settle"):
                if meth in vars(cls):
                    setattr(cls, meth, _timed(vars(cls)[meth], f"{cls.__name__}.{meth}"))
    service.Worker._poll = _timed(service.Worker._poll, "poll")
    service.Worker._loop = _timed(service.Worker._loop, "loop (main thread, all of it)")


_gc_started: dict[int, float] = {}


def _gc(phase: str, info: dict) -> None:
    """Garbage collections, per generation: thread CPU and count (any thread)."""
    gen = info["generation"]
    if phase == "start":
        _gc_started[threading.get_ident()] = time.thread_time()
        return
    t = _gc_started.pop(threading.get_ident(), None)
    if t is not None:
        a = _acc.setdefault(f"gc generation {gen}", [0.0, 0])
        a[0] += time.thread_time() - t
        a[1] += 1


def _watch() -> None:
    while True:
        svc = sys.modules.get("worker.service")
        if svc is not None and hasattr(svc, "Worker") and "worker.delivery" in sys.modules:
            _patch()
            gc.callbacks.append(_gc)
            return
        time.sleep(0.001)


def _dump(started: float) -> None:
    with open(OUT, "a") as f:
        f.write(json.dumps({"process_cpu_s": time.process_time() - started, **_acc}) + "\n")


if OUT:
    threading.Thread(target=_watch, daemon=True, name="cpu-split").start()
    atexit.register(_dump, time.process_time())
