"""Where a scorer's forward runs: eagerly, or through static batches (CUDA graphs).

An executor takes host rows to the device, runs a forward over them and brings the
packed result back; it never holds the forward (a stored bound method would make a
reference cycle that keeps the scorer's GPU memory alive until the next garbage
collection). One executor serves one scorer: a captured graph belongs to the model
it was captured with.

- `EagerExecutor`: the forward as it comes, on any device. On CUDA the rows go
  through a pinned staging buffer (non-blocking copy in) and the result through a
  pinned result buffer (one non-blocking copy back, one synchronize); both are
  reused across batches.
- `StaticBatchExecutor`: a batch of n rows is padded to the next power of two in
  [GRAPH_MIN_ROWS, max_rows] and run on that bucket's fixed buffers; on CUDA the
  forward is captured once per bucket as a CUDA graph and replayed, elsewhere it
  runs eagerly on the same buffers (how the CPU tests exercise bucketing and
  padding). A larger batch runs eagerly. `load_scorer` builds every bucket while it
  checks the golden batch (in the checkpoint watcher's thread, before the swap), so
  the loop thread never stalls on a capture.

Captures: each executor captures on a side stream of its own into one memory pool
of its own, shared by its buckets' graphs (they replay one at a time, so a later
graph may reuse an earlier one's intermediates: a result is valid until the next
run, as with every executor).
Nothing of one scorer's graphs (a cuBLAS workspace, a pool block) is used by another
scorer's, so dropping the old scorer on a hot swap cannot free memory the new
graphs replay on. A capture that runs out of memory is retried after
CAPTURE_RETRY_S (that bucket scores eagerly meanwhile); any other refused capture
turns the static batches off for this executor, which goes on eagerly. Either way
the calling thread is back on its own stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import structlog
import torch

log = structlog.get_logger("worker.executors")

# forward(rows on the device [n, D], explain) -> packed float32 results [n, C]; explain
# (which rows get explanations) is the scorer's, passed through as is
Forward = Callable[[torch.Tensor, str], torch.Tensor]

GRAPH_MIN_ROWS = 64
GRAPH_MAX_ROWS = 1 << 18

# After a capture ran out of memory, that bucket scores eagerly this long before the
# capture is tried again.
CAPTURE_RETRY_S = 30.0

# One capture at a time in the process (the checkpoint watcher's thread captures a new
# model's graphs while the loop thread may retry a bucket of the serving one).
_CAPTURE_LOCK = threading.Lock()


class CaptureSide:
    """One executor's side stream and graph memory pool (CUDA only)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()


def bucket_rows(
    n: int, max_rows: int = GRAPH_MAX_ROWS, min_rows: int = GRAPH_MIN_ROWS
) -> int | None:
    """The static batch size n rows are padded to: the next power of two ≥ n (at least
    min_rows), or None when that exceeds max_rows (score eagerly)."""
    if n < 1:
        return None
    rows = max(min_rows, 1 << (n - 1).bit_length())
    return rows if rows <= max_rows else None


def pad_into(buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Copy x [n, D] into the first n rows of buffer [rows, D] and zero the rest.

    Rows are scored independently (no batch statistics anywhere in the model), so the
    padding rows never change a real row's score; they are zeroed only so that no
    stale row is computed. Returns buffer.
    """
    n = x.shape[0]
    buffer[:n].copy_(x, non_blocking=True)
    if n < buffer.shape[0]:
        buffer[n:].zero_()
    return buffer


class EagerExecutor:
    """Runs the forward as it comes, on any device."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self._host_in: torch.Tensor | None = None
        self._host_out: torch.Tensor | None = None

    @property
    def explains_selectively(self) -> bool:
        """Whether the forward may pick the rows to explain itself: a data-dependent
        shape (never inside a CUDA graph; a device-to-host sync on CUDA), worth it on
        CPU, where explaining every row costs more than scoring it."""
        return self.device.type == "cpu"

    def all_bucket_sizes(self) -> list[int]:
        """The static batch sizes this executor can build: none (any shape runs as it comes)."""
        return []

    def run(self, forward: Forward, x: torch.Tensor, explain: str) -> torch.Tensor:
        """forward over rows x (on the host or the device): the packed result on the
        device, valid until the next run."""
        return forward(x.to(self.device, non_blocking=True), explain)

    def score(self, forward: Forward, x: np.ndarray, explain: str) -> np.ndarray:
        """Host rows float32 [n, D] in, the packed result [n, C] out (the caller's own)."""
        return self._fetch(self.run(forward, self._stage(x), explain))

    def _stage(self, x: np.ndarray) -> torch.Tensor:
        """Host rows as float32 [n, D]: in the pinned staging buffer on CUDA, as is elsewhere."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not self._pinned:
            return t
        self._host_in = self._host_buffer(self._host_in, t.numel())
        return self._host_in[: t.numel()].view(t.shape).copy_(t)

    def _fetch(self, packed: torch.Tensor) -> np.ndarray:
        if not self._pinned:
            return packed.numpy()  # a fresh tensor: its memory is the caller's
        self._host_out = self._host_buffer(self._host_out, packed.numel())
        host = self._host_out[: packed.numel()].view(packed.shape)
        host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.numpy().copy()  # the pinned buffer is reused by the next batch

    def _host_buffer(self, current: torch.Tensor | None, numel: int) -> torch.Tensor:
        """A flat pinned float32 buffer of at least numel elements, reused while big enough."""
        if current is not None and current.numel() >= numel:
            return current
        size = max(1 << max(numel - 1, 0).bit_length(), 1 << 16)
        return torch.empty(size, dtype=torch.float32).pin_memory()


class StaticBatchExecutor(EagerExecutor):
    """Bucketed static batches: CUDA graphs on CUDA, eager on fixed padded buffers elsewhere."""

    def __init__(
        self,
        device: torch.device | str,
        max_rows: int = GRAPH_MAX_ROWS,
        capture: bool | None = None,
    ):
        super().__init__(device)
        self.max_rows = max_rows
        # capture graphs: on CUDA unless told (the CPU tests force it to check the fallback)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self._batches: dict[tuple[int, str], _StaticBatch] | None = {}
        self._side: CaptureSide | None = None
        self._retry_at: dict[tuple[int, str], float] = {}

    @property
    def explains_selectively(self) -> bool:
        return False  # static shapes

    @property
    def static(self) -> bool:
        """False once a refused capture has turned static batches off."""
        return self._batches is not None

    @property
    def bucket_sizes(self) -> set[int]:
        """The row counts of the static batches built so far."""
        return {rows for rows, _ in self._batches or {}}

    def all_bucket_sizes(self) -> list[int]:
        """Every bucket this executor can build, smallest first (none once static
        batches are off)."""
        if self._batches is None:
            return []
        sizes, rows = [], GRAPH_MIN_ROWS
        while rows <= self.max_rows:
            sizes.append(rows)
            rows *= 2
        return sizes

    def replays_graph(self, n: int, explain: str = "all") -> bool:
        """Whether a batch of n rows replays a captured CUDA graph (else it runs eagerly)."""
        rows = bucket_rows(n, self.max_rows) if self._batches is not None else None
        batch = self._batches.get((rows, explain)) if rows is not None else None
        return batch is not None and batch.graph is not None

    def _fetch(self, packed: torch.Tensor) -> np.ndarray:
        host = super()._fetch(packed)
        # off CUDA that is a view of a static batch's result buffer, reused by the next run
        return host if self._pinned else host.copy()

    def run(self, forward: Forward, x: torch.Tensor, explain: str) -> torch.Tensor:
        rows = bucket_rows(x.shape[0], self.max_rows) if self._batches is not None else None
        if rows is None:
            return super().run(forward, x, explain)
        key = (rows, explain)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._build(forward, key, x.shape[1])
            if batch is None:
                return super().run(forward, x, explain)
        return batch.run(forward, x, explain)

    def _build(self, forward: Forward, key: tuple[int, str], dim: int) -> _StaticBatch | None:
        """The static batch for a bucket, or None (score eagerly) while a capture that ran
        out of memory waits for its retry, or for good once a capture was refused."""
        if time.monotonic() < self._retry_at.get(key, 0.0):
            return None
        rows, explain = key
        try:
            if self.capture and self._side is None:
                self._side = CaptureSide(self.device)
            batch = _StaticBatch(forward, explain, rows, dim, self.device, self._side)
        except torch.OutOfMemoryError as e:  # may pass once memory is freed: retry later
            self._retry_at[key] = time.monotonic() + CAPTURE_RETRY_S
            self._side = None  # a fresh stream and pool for the retry
            log.warning(
                "cuda_graph_capture_out_of_memory",
                device=str(self.device),
                rows=rows,
                retry_in_s=CAPTURE_RETRY_S,
                error=str(e).splitlines()[0] if str(e) else "",
            )
            return None
        except RuntimeError as e:  # a capture the driver refuses: keep scoring, eagerly
            log.warning("cuda_graphs_disabled", device=str(self.device), error=str(e))
            self._batches = None
            self._side = None
            return None
        self._retry_at.pop(key, None)
        self._batches[key] = batch
        return batch


class _StaticBatch:
    """Fixed device buffers for one bucket and the forward over them, captured as a
    CUDA graph on `side` (its stream and pool) when given, else run eagerly on the
    same buffers."""

    def __init__(
        self,
        forward: Forward,
        explain: str,
        rows: int,
        dim: int,
        device: torch.device,
        side: CaptureSide | None,
    ):
        self.x = torch.zeros((rows, dim), dtype=torch.float32, device=device)
        self.out: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        if side is not None:
            self.graph, self.out = capture_graph(forward, explain, self.x, side)

    def run(self, forward: Forward, x: torch.Tensor, explain: str) -> torch.Tensor:
        """Forward of x [n, D] padded to this bucket; a view of the first n result rows,
        valid until the next run."""
        pad_into(self.x, x)
        if self.graph is None:
            self.out = forward(self.x, explain)
        else:
            self.graph.replay()
        return self.out[: x.shape[0]]


def capture_graph(
    forward: Forward, explain: str, x: torch.Tensor, side: CaptureSide
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """forward over the static input x captured as a CUDA graph on side's stream into
    side's pool, and its static result. The calling thread ends on the stream it
    started on, also when the capture fails (torch.cuda.graph's exit skips restoring
    the stream when ending the capture raises)."""
    device = x.device
    with _CAPTURE_LOCK:
        caller = torch.cuda.current_stream(device)
        try:
            # Warm up on the capture stream (cuBLAS sets up its handle and workspace for
            # that stream), then capture. thread_local: the loop thread keeps scoring
            # with the serving model while the watcher's thread captures a new one.
            side.stream.wait_stream(caller)
            with torch.cuda.stream(side.stream):
                for _ in range(2):
                    forward(x, explain)
            caller.wait_stream(side.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                graph, pool=side.pool, stream=side.stream, capture_error_mode="thread_local"
            ):
                out = forward(x, explain)
            return graph, out
        finally:
            if torch.cuda.current_stream(device) != caller:
                torch.cuda.set_stream(caller)


def gpu_memory(device: torch.device, graph_pools: bool = False) -> dict[str, int]:
    """Bytes of GPU memory this process holds on a CUDA device: "allocated" (live
    tensors), "reserved" (held by PyTorch's caching allocator, CUDA graph pools
    included) and, when asked (a memory snapshot: on a swap, not per batch),
    "graph_pools" (the reserved segments that belong to graph pools)."""
    out = {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
    }
    if graph_pools:
        index = device.index if device.index is not None else torch.cuda.current_device()
        out["graph_pools"] = graph_pool_bytes(torch.cuda.memory_snapshot(), index)
    return out


def release_cached_memory() -> None:
    """Hand the caching allocator's free blocks back to the driver, a dropped scorer's
    graph pools among them (PyTorch frees a dead graph pool only then); never during a
    capture. Live graphs' pools are kept."""
    with _CAPTURE_LOCK:
        torch.cuda.empty_cache()


def graph_pool_bytes(segments: list[dict], device_index: int) -> int:
    """The size of the segments of a memory snapshot (torch.cuda.memory_snapshot())
    that belong to a private pool (CUDA graphs): pool id other than (0, 0)."""
    return sum(
        seg["total_size"]
        for seg in segments
        if seg.get("device") == device_index and tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)
    )


def make_executor(
    device: torch.device | str, cuda_graphs: bool = True, graph_max_rows: int = GRAPH_MAX_ROWS
) -> EagerExecutor:
    """Static batches with CUDA graphs on CUDA when cuda_graphs; eager otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and cuda_graphs:
        return StaticBatchExecutor(device, graph_max_rows)
    return EagerExecutor(device)
