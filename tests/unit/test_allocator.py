"""worker/allocator.py: freed memory is kept in the process (glibc), an operator's own
glibc settings win."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from worker.allocator import ENV, keep_freed_memory

GLIBC = platform.libc_ver()[0] == "glibc"

# In a process of its own: after keep_freed_memory(), a 1 MiB block comes from the heap,
# not from mmap (glibc's mallinfo2: hblks counts the blocks it mapped).
PROBE = """
import ctypes, ctypes.util, sys
from worker.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped_by_a_1_mib_block():
    before = libc.mallinfo2().hblks
    p = libc.malloc(1 << 20)
    after = libc.mallinfo2().hblks
    libc.free(p)
    return after - before

print(mapped_by_a_1_mib_block(), keep_freed_memory(), mapped_by_a_1_mib_block())
"""


@pytest.mark.skipif(not GLIBC, reason="the probe reads glibc's mallinfo2")
def test_a_1_mib_block_comes_from_the_heap_once_freed_memory_is_kept():
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert out == ["1", "True", "0"]


def test_it_applies_where_the_c_library_has_mallopt(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    assert keep_freed_memory() is GLIBC


@pytest.mark.parametrize("name", ENV)
def test_an_operator_s_own_glibc_setting_wins(monkeypatch, name):
    monkeypatch.setenv(name, "131072")
    assert keep_freed_memory() is False
