"""Batch scoring on the device: scale → model → per-feature error → score → p-value → decision.

Scoring (a number, high = anomalous) is separate from deciding (score ≥ threshold);
both travel in the checkpoint, so offline scoring and the streaming worker agree.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import structlog
import torch

from worker.checkpoint import Checkpoint, GoldenMismatch, Manifest, read_checkpoint

Precision = Literal["fp32", "bf16"]
Explain = Literal["all", "anomalies", "none"]

log = structlog.get_logger("worker.scoring")

# CUDA graphs: a batch of n rows is padded to the next power of two in
# [GRAPH_MIN_ROWS, GRAPH_MAX_ROWS] and replayed through the graph captured for that
# size (captured on first use); a larger batch runs eagerly.
GRAPH_MIN_ROWS = 64
GRAPH_MAX_ROWS = 1 << 18

# One capture at a time in the process (the checkpoint watcher's thread captures a new
# model's graphs while the loop thread may capture a new bucket of the serving one),
# on one side stream per device: cuBLAS keeps a workspace per stream, so a stream per
# scorer would grow GPU memory with every reload.
_CAPTURE_LOCK = threading.Lock()
_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream graphs are captured on (call with _CAPTURE_LOCK held)."""
    key = torch.device(
        "cuda", device.index if device.index is not None else torch.cuda.current_device()
    )
    if key not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[key] = torch.cuda.Stream(key)
    return _CAPTURE_STREAMS[key]


@dataclass(frozen=True, slots=True)
class BatchScores:
    """Host-side results for one batch of B rows (numpy arrays, first axis B)."""

    scores: np.ndarray  # float32 [B]
    p_values: np.ndarray  # float32 [B]
    is_anomaly: np.ndarray  # bool [B]
    # Explanations, for the rows in `explained` only (E of them; all rows by default):
    explained: np.ndarray  # int64 [E] row indices
    top_index: np.ndarray  # int64 [E, k] feature indices, largest contribution first
    top_contribution: np.ndarray  # float32 [E, k] share of the row's error
    top_expected: np.ndarray  # float32 [E, k] reconstruction in input units


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    return device


def reconstruction_errors(
    model: torch.nn.Module, x_scaled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature squared error in scaled units, and the reconstruction."""
    recon = model(x_scaled)
    return (x_scaled - recon).square(), recon


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


ScoreKind = Literal["mse", "mae"]


def errors_to_score(err: torch.Tensor, kind: ScoreKind) -> torch.Tensor:
    """One score per row from its per-feature squared errors (scaled units).

    ``mae``: mean absolute error — each feature's residual counts linearly, so a
    few noisy, poorly reconstructed features do not drown a deviation spread over
    many. ``mse``: mean squared error. The trainer and the worker both score through
    this function, with the kind the checkpoint's manifest names.
    """
    if kind == "mae":
        return err.sqrt().mean(dim=1)
    if kind == "mse":
        return err.mean(dim=1)
    raise ValueError(f"unknown score {kind!r}")


class _StaticBatch:
    """Fixed device buffers for one bucket size and the scoring forward over them.

    On CUDA the forward is captured once as a CUDA graph and replayed; elsewhere it
    runs eagerly on the same buffers (how the CPU tests exercise bucketing and padding). The forward is passed in, never stored: a stored
    bound method would make a reference cycle that keeps the scorer's GPU memory
    alive until the next garbage collection.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        rows: int,
        dim: int,
        device: torch.device,
    ):
        self.x = torch.zeros((rows, dim), dtype=torch.float32, device=device)
        self.out: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        if device.type != "cuda":
            return
        with _CAPTURE_LOCK:
            stream = _capture_stream(device)
            # Warm up on the capture stream (cuBLAS sets up its handle and workspace for
            # that stream), then capture. thread_local: the loop thread keeps scoring
            # with the serving model while the watcher's thread captures a new one.
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    forward(self.x)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self.out = forward(self.x)
            self.graph = graph

    def run(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Forward of x [n, D] padded to this bucket; a view of the first n output rows,
        valid until the next run."""
        pad_into(self.x, x)
        if self.graph is None:
            self.out = forward(self.x)
        else:
            self.graph.replay()
        return self.out[: x.shape[0]]


class Scorer:
    """A verified model resident on one device, scoring whole batches at once.

    On CUDA a batch travels host → pinned staging buffer → device (non-blocking),
    through one CUDA graph replay (scale → model → per-feature error → score, p-value,
    top features, packed in one tensor; `cuda_graphs=False` or a batch over
    `graph_max_rows` runs the same forward eagerly) → one non-blocking copy into a
    pinned result buffer → one synchronize. Pinned buffers and graphs are reused
    across batches. A Scorer is used by one thread at a time.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device | str = "cpu",
        precision: Precision = "fp32",
        top_k: int = 3,
        cuda_graphs: bool = True,
        graph_max_rows: int = GRAPH_MAX_ROWS,
    ):
        self.manifest: Manifest = checkpoint.manifest
        self.version = self.manifest.version
        self.device = torch.device(device)
        self.precision = precision
        self.top_k = min(top_k, self.manifest.input_dim)
        self.model = checkpoint.build_model(self.device)
        if precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        m = self.manifest
        f32 = dict(dtype=torch.float32, device=self.device)
        self._center = torch.tensor(m.scaler.center, **f32)
        self._inv_scale = 1.0 / torch.tensor(m.scaler.scale, **f32)
        self._scale = torch.tensor(m.scaler.scale, **f32)
        self._calibration = torch.tensor(m.calibration, **f32)
        self.threshold = float(m.threshold)
        cuda = self.device.type == "cuda"
        # The packed path (everything computed on the device, one copy back) serves
        # CUDA; CPU explains only the rows that need it. Static batches (bucketed,
        # padded) serve CUDA graphs. Tests switch both on for CPU to check padding.
        self._packed = cuda
        self._graphs: dict[tuple[int, bool], _StaticBatch] | None = (
            {} if cuda and cuda_graphs else None
        )
        self.graph_max_rows = graph_max_rows
        self._host_in: torch.Tensor | None = None  # flat float32 staging, pinned on CUDA
        self._host_out: torch.Tensor | None = None

    @property
    def input_dim(self) -> int:
        return self.manifest.input_dim

    @property
    def feature_names(self) -> list[str]:
        return self.manifest.feature_names

    @property
    def cuda_graphs(self) -> bool:
        """Whether batches up to graph_max_rows replay captured CUDA graphs."""
        return self._graphs is not None and self.device.type == "cuda"

    @property
    def _model_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    # -- host buffers ----------------------------------------------------------------

    def _host_buffer(self, current: torch.Tensor | None, numel: int) -> torch.Tensor:
        """A flat float32 host buffer of at least numel elements, reused while big enough."""
        if current is not None and current.numel() >= numel:
            return current
        size = max(1 << max(numel - 1, 0).bit_length(), 1024 * self.input_dim)
        buffer = torch.empty(size, dtype=torch.float32)
        return buffer.pin_memory() if self.device.type == "cuda" else buffer

    def _staged(self, x: np.ndarray) -> torch.Tensor:
        """Host rows as float32 [n, D]: in the pinned staging buffer on CUDA, as is on CPU."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not self._packed:
            return t
        self._host_in = self._host_buffer(self._host_in, t.numel())
        return self._host_in[: t.numel()].view(t.shape).copy_(t)

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        return self._staged(x).to(self.device, non_blocking=True)

    # -- the forward -----------------------------------------------------------------

    def _errors(self, xd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature squared error (scaled units, float32) and the reconstruction.

        The model runs in its precision; the residual is taken in float32 (for fp32
        this is exactly `reconstruction_errors`).
        """
        xs = (xd - self._center) * self._inv_scale
        recon = self.model(xs.to(self._model_dtype)).float()
        return (xs - recon).square(), recon

    def _p_values(self, scores: torch.Tensor) -> torch.Tensor:
        n_cal = self._calibration.numel()
        below = torch.searchsorted(self._calibration, scores, side="left")
        return (n_cal - below + 1).float() / (n_cal + 1)

    def _explain(
        self, err: torch.Tensor, recon: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k features of each given row: (index, share of the row's error, expected value)."""
        top_err, top_idx = torch.topk(err, self.top_k, dim=1)
        total = err.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        expected = torch.gather(recon, 1, top_idx) * self._scale[top_idx] + self._center[top_idx]
        return top_idx, top_err / total, expected

    def _forward(self, xd: torch.Tensor, explain: bool) -> torch.Tensor:
        """Packed float32 [B, 2 + 3k]: score, p-value, then (when explain) the top-k
        contributions, expected values and feature indices (exact in float32)."""
        err, recon = self._errors(xd)
        scores = errors_to_score(err, self.manifest.score)
        cols = [scores[:, None], self._p_values(scores)[:, None]]
        if explain:
            idx, contribution, expected = self._explain(err, recon)
            cols += [contribution, expected, idx.float()]
        return torch.cat(cols, dim=1)

    def _static(self, rows: int, explain: bool, forward) -> _StaticBatch:
        key = (rows, explain)
        batch = self._graphs.get(key)
        if batch is None:
            batch = _StaticBatch(forward, rows, self.input_dim, self.device)
            self._graphs[key] = batch
        return batch

    def _run(self, xd: torch.Tensor, explain: bool) -> torch.Tensor:
        """Packed forward of rows xd (host staging or device): through the static batch of
        its bucket when there is one, else eagerly. The result is valid until the next call."""
        forward = partial(self._forward, explain=explain)
        rows = bucket_rows(xd.shape[0], self.graph_max_rows) if self._graphs is not None else None
        if rows is None:
            return forward(xd.to(self.device, non_blocking=True))
        try:
            batch = self._static(rows, explain, forward)
        except RuntimeError as e:  # a capture the driver refuses: keep scoring, eagerly
            if self.device.type != "cuda":
                raise
            log.warning("cuda_graphs_disabled", version=self.version, error=str(e))
            self._graphs = None
            return forward(xd.to(self.device, non_blocking=True))
        return batch.run(forward, xd)

    # -- public API ------------------------------------------------------------------

    @torch.inference_mode()
    def score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Scores only, for a float32 tensor already on the device (benchmarks, evaluation)."""
        if self._graphs is None:
            err, _ = self._errors(x)
            return errors_to_score(err, self.manifest.score)
        return self._run(x, explain=False)[:, 0].clone()

    @torch.inference_mode()
    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """The model's reconstruction of raw rows, in input units (float32 [B, D])."""
        _, recon = self._errors(self._to_device(x))
        return (recon * self._scale + self._center).cpu().numpy()

    @torch.inference_mode()
    def score_batch(self, x: np.ndarray, explain: Explain = "all") -> BatchScores:
        """Score B raw rows (float32 [B, D], input units).

        `explain` chooses the rows that get their top contributing features: every
        row, only the anomalous ones (what the worker publishes by default), or none.
        """
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected rows of {self.input_dim} features, got shape {x.shape}")
        if self._packed:
            return self._score_packed(x, explain)
        xd = self._staged(x)
        err, recon = self._errors(xd)
        scores = errors_to_score(err, self.manifest.score)
        out = torch.stack([scores, self._p_values(scores)], dim=1).numpy()
        is_anomaly = out[:, 0] >= self.threshold
        rows = _explained_rows(explain, is_anomaly)
        if len(rows) < len(out):
            sel = torch.from_numpy(rows)
            err, recon = err[sel], recon[sel]
        top_idx, contribution, expected = self._explain(err, recon)
        return BatchScores(
            scores=out[:, 0].copy(),
            p_values=out[:, 1].copy(),
            is_anomaly=is_anomaly,
            explained=rows,
            top_index=top_idx.numpy(),
            top_contribution=contribution.numpy(),
            top_expected=expected.numpy(),
        )

    def _score_packed(self, x: np.ndarray, explain: Explain) -> BatchScores:
        """Device path: one copy in, one forward (graph replay), one copy back, one sync."""
        k = self.top_k
        packed = self._run(self._staged(x), explain != "none")
        self._host_out = self._host_buffer(self._host_out, packed.numel())
        host = self._host_out[: packed.numel()].view(packed.shape)
        host.copy_(packed, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        out = host.numpy().copy()  # the pinned buffer is reused by the next batch
        is_anomaly = out[:, 0] >= self.threshold
        rows = _explained_rows(explain, is_anomaly)
        top = out[rows] if explain != "none" else np.empty((0, 2 + 3 * k), dtype=np.float32)
        return BatchScores(
            scores=out[:, 0].copy(),
            p_values=out[:, 1].copy(),
            is_anomaly=is_anomaly,
            explained=rows,
            top_index=top[:, 2 + 2 * k :].astype(np.int64),
            top_contribution=np.ascontiguousarray(top[:, 2 : 2 + k]),
            top_expected=np.ascontiguousarray(top[:, 2 + k : 2 + 2 * k]),
        )


def _explained_rows(explain: Explain, is_anomaly: np.ndarray) -> np.ndarray:
    if explain == "all":
        return np.arange(len(is_anomaly))
    if explain == "anomalies":
        return np.flatnonzero(is_anomaly)
    return np.empty(0, dtype=np.int64)


def precision_agreement(
    reference: np.ndarray, other: np.ndarray, threshold: float
) -> dict[str, float | int]:
    """How well scores from another precision (bf16) agree with reference (fp32) scores.

    max/median relative error, Spearman rank correlation, and decisions (score ≥
    threshold): the fraction that agree and how many rows flip each way.
    """
    ref = np.asarray(reference, dtype=np.float64)
    oth = np.asarray(other, dtype=np.float64)
    if ref.shape != oth.shape or ref.ndim != 1 or not len(ref):
        raise ValueError(f"need two equal non-empty score vectors, got {ref.shape} and {oth.shape}")
    rel = np.abs(oth - ref) / np.maximum(np.abs(ref), np.finfo(np.float32).tiny)
    ranks = [np.argsort(np.argsort(v, kind="stable"), kind="stable") for v in (ref, oth)]
    spearman = float(np.corrcoef(*ranks)[0, 1]) if len(ref) > 1 else 1.0
    a, b = ref >= threshold, oth >= threshold
    return {
        "rows": int(len(ref)),
        "max_rel_error": float(rel.max()),
        "median_rel_error": float(np.median(rel)),
        "spearman": spearman,
        "decision_agreement": float((a == b).mean()),
        "flagged_reference": int(a.sum()),
        "flagged_other": int(b.sum()),
        "flips_to_anomaly": int((b & ~a).sum()),
        "flips_to_normal": int((a & ~b).sum()),
    }


def golden_tolerance(device: torch.device, precision: Precision) -> tuple[float, float]:
    """(rtol, atol) for reproducing the trainer's golden scores on this device."""
    if precision == "bf16":
        return 5e-2, 1e-3
    if device.type == "cpu":
        return 1e-5, 1e-7
    return 1e-3, 1e-6


def verify_golden(scorer: Scorer) -> None:
    g = scorer.manifest.golden
    got = scorer.score_batch(np.asarray(g.inputs, dtype=np.float32)).scores.astype(np.float64)
    want = np.asarray(g.scores, dtype=np.float64)
    rtol, atol = golden_tolerance(scorer.device, scorer.precision)
    if not np.allclose(got, want, rtol=rtol, atol=atol):
        worst = int(np.argmax(np.abs(got - want)))
        raise GoldenMismatch(
            f"{scorer.version}: golden row {worst} scores {got[worst]:.6g} on {scorer.device}, "
            f"checkpoint says {want[worst]:.6g}"
        )


def load_scorer(
    version_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    precision: Precision = "fp32",
    cuda_graphs: bool = True,
    top_k: int = 3,
) -> Scorer:
    """Read, verify and build a scorer; the golden batch must reproduce on `device`
    (through the CUDA graph path when that is on)."""
    scorer = Scorer(
        read_checkpoint(version_dir),
        device=device,
        precision=precision,
        cuda_graphs=cuda_graphs,
        top_k=top_k,
    )
    verify_golden(scorer)
    return scorer
