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


def test_freeze_survivors_collects_first_then_freezes_what_is_left():
    import gc
    import weakref

    from worker.allocator import freeze_survivors

    class Node:
        pass

    def seen(obj) -> bool:  # by the cyclic collector (frozen objects are not)
        return any(o is obj for o in gc.get_objects())

    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle: only the cyclic collector frees it
    gone = weakref.ref(a)
    del a, b
    survivor = Node()
    assert seen(survivor)
    try:
        assert freeze_survivors() > 0
        assert gone() is None  # collected before the freeze, not frozen for good
        assert not seen(survivor)
        assert seen(Node())  # what comes later is collected as usual
    finally:
        gc.unfreeze()


def test_a_swapped_out_model_is_freed_without_the_cyclic_collector(tmp_path):
    # The worker freezes what survives start-up, the first model included; a frozen
    # object caught in a reference cycle would never be freed. A Scorer has none.
    import gc
    import weakref

    from tests.support import normal_rows
    from training.fit import TrainConfig, fit
    from worker.checkpoint import publish, read_latest
    from worker.scoring import load_scorer

    result = fit(normal_rows(300, 0), [f"f{i}" for i in range(8)], TrainConfig(max_epochs=2))
    publish(tmp_path, result.model, result.manifest)
    scorer = load_scorer(tmp_path / read_latest(tmp_path), device="cpu")
    scorer.score_batch(normal_rows(64, 1))
    refs = [weakref.ref(scorer), weakref.ref(scorer.model), weakref.ref(scorer.executor)]
    gc.disable()
    try:
        del scorer
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()
