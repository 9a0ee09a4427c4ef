"""Batch scoring on the device: scale → model → per-feature error → score → p-value → decision.

Scoring (a number, high = anomalous) is separate from deciding (score ≥ threshold);
both travel in the checkpoint, so offline scoring and the streaming worker agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from worker.checkpoint import Checkpoint, GoldenMismatch, Manifest, read_checkpoint

Precision = Literal["fp32", "bf16"]
Explain = Literal["all", "anomalies", "none"]


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


class Scorer:
    """A verified model resident on one device, scoring whole batches at once."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device | str = "cpu",
        precision: Precision = "fp32",
        top_k: int = 3,
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
        self._pinned: torch.Tensor | None = None

    @property
    def input_dim(self) -> int:
        return self.manifest.input_dim

    @property
    def feature_names(self) -> list[str]:
        return self.manifest.feature_names

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.device.type != "cuda":
            return t
        n = t.shape[0]
        if self._pinned is None or self._pinned.shape[0] < n:
            self._pinned = torch.empty(
                (max(n, 1024), self.input_dim), dtype=torch.float32
            ).pin_memory()
        staging = self._pinned[:n]
        staging.copy_(t)
        return staging.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Scores only, for a float32 tensor already on the device (benchmarks, evaluation)."""
        xs = (x - self._center) * self._inv_scale
        err, _ = reconstruction_errors(self.model, xs.to(self._model_dtype))
        return errors_to_score(err.float(), self.manifest.score)

    @property
    def _model_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @torch.inference_mode()
    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """The model's reconstruction of raw rows, in input units (float32 [B, D])."""
        xs = (self._to_device(x) - self._center) * self._inv_scale
        recon = self.model(xs.to(self._model_dtype)).float()
        return (recon * self._scale + self._center).cpu().numpy()

    @torch.inference_mode()
    def score_batch(self, x: np.ndarray, explain: Explain = "all") -> BatchScores:
        """Score B raw rows (float32 [B, D], input units).

        `explain` chooses the rows that get their top contributing features: every
        row, only the anomalous ones (what the worker publishes by default), or none.
        """
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected rows of {self.input_dim} features, got shape {x.shape}")
        xd = self._to_device(x)
        xs = (xd - self._center) * self._inv_scale
        err, recon = reconstruction_errors(self.model, xs.to(self._model_dtype))
        err = err.float()
        scores = errors_to_score(err, self.manifest.score)
        n_cal = self._calibration.numel()
        below = torch.searchsorted(self._calibration, scores, side="left")
        p_values = (n_cal - below + 1).float() / (n_cal + 1)
        out = torch.stack([scores, p_values], dim=1).cpu().numpy()
        is_anomaly = out[:, 0] >= self.threshold
        if explain == "all":
            rows = np.arange(len(out))
        elif explain == "anomalies":
            rows = np.flatnonzero(is_anomaly)
        else:
            rows = np.empty(0, dtype=np.int64)
        if len(rows) == len(out):
            e_err, e_recon = err, recon
        else:
            sel = torch.from_numpy(rows).to(err.device)
            e_err, e_recon = err[sel], recon[sel]
        top_err, top_idx = torch.topk(e_err, self.top_k, dim=1)
        total = e_err.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        top_expected = (
            torch.gather(e_recon.float(), 1, top_idx) * self._scale[top_idx] + self._center[top_idx]
        )
        return BatchScores(
            scores=out[:, 0].copy(),
            p_values=out[:, 1].copy(),
            is_anomaly=is_anomaly,
            explained=rows,
            top_index=top_idx.cpu().numpy(),
            top_contribution=(top_err / total).cpu().numpy(),
            top_expected=top_expected.cpu().numpy(),
        )


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
) -> Scorer:
    """Read, verify and build a scorer; the golden batch must reproduce on `device`."""
    scorer = Scorer(read_checkpoint(version_dir), device=device, precision=precision)
    verify_golden(scorer)
    return scorer
