"""The worker process's memory settings: freed memory kept in the process, and
long-lived objects kept out of the cyclic garbage collector's way.

**Freed memory kept** instead of handed back to the kernel every batch.

glibc serves blocks of 128 KiB and more with mmap and unmaps them on free, and it trims
free memory off the top of its heap. A micro-batch allocates dozens of such blocks (the
decoded rows, the knn distance chunks, the stuck-feature check's arrays, the tracker's
journal), so every batch mapped them afresh and took a page fault for every 4 KiB of
them. With the two limits raised, blocks up to 32 MiB come from the heap, and up to
256 MiB of free heap is kept for the next batch (docs/benchmarks.md, "Freed memory
kept"). Resident memory then stays near its peak instead of breathing with each batch.

Operators who set glibc's own MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ keep
their values; on a C library without mallopt (musl, macOS) nothing changes.

**Long-lived objects frozen** (`freeze_survivors`). Once the worker has started, its
process holds ~200 000 objects the cyclic collector tracks: torch's and kafka-python's
modules, the model, the clients. Each full collection, which the per-batch allocations
trigger every second or two, walked all of them: ~0.1 s each, 3–4 µs a record
(docs/benchmarks.md, "Start-up objects frozen"). After start-up and after every model
swap the worker collects once and freezes what survived (`gc.freeze`), so the collector
walks only what came later. A frozen object that later becomes garbage is freed by
reference counting as usual; only one caught in a reference cycle would stay. A swapped-
out model is freed by reference counting (`tests/unit/test_allocator.py` checks it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64 bits)
TRIM_THRESHOLD = 256 << 20
ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; whether they were raised."""
    if any(v in os.environ for v in ENV):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and (
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )


def freeze_survivors() -> int:
    """Collect what garbage there is, then keep every object alive now out of the cyclic
    collector's sight (gc.freeze). Returns the number of objects frozen in all."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
