"""Keep freed memory in the process instead of handing it back to the kernel every batch.

glibc serves blocks of 128 KiB and more with mmap and unmaps them on free, and it trims
free memory off the top of its heap. A micro-batch allocates dozens of such blocks (the
decoded rows, the knn distance chunks, the stuck-feature check's arrays, the tracker's
journal), so every batch mapped them afresh and took a page fault for every 4 KiB of
them. With the two limits raised, blocks up to 32 MiB come from the heap, and up to
256 MiB of free heap is kept for the next batch (docs/benchmarks.md, "Freed memory
kept"). Resident memory then stays near its peak instead of breathing with each batch.

Operators who set glibc's own MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ keep
their values; on a C library without mallopt (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
