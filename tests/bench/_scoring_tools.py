"""Scoring helpers only the benchmarks use: the scoring step on a device-resident
batch, and how far another precision's scores agree with fp32's."""

from __future__ import annotations

import numpy as np
import torch

from worker.scoring import Scorer


@torch.inference_mode()
def score_tensor(scorer: Scorer, x: torch.Tensor) -> torch.Tensor:
    """Scores only, for a float32 tensor already on the scorer's device, through its
    executor (CUDA graphs when it has them); no host copy and no synchronize."""
    return scorer.executor.run(scorer.forward, x, "none")[:, 0].clone()


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
