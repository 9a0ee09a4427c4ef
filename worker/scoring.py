"""Batch scoring: scale → score → p-value → top-k explanation.

The score is either the autoencoder's reconstruction error (scale → model → per-feature
error → score; manifests with score "mae" or "mse") or the mean distance to the k
nearest reference rows stored with the model (score "knn"; the default since the
evaluation on unseen data sets, docs/eval). Either way the explanation is a
per-feature squared difference: from the reconstruction, or from the mean of the row's
k nearest reference rows.

Scoring (a number, high = anomalous) is separate from deciding (score ≥ threshold);
both travel in the checkpoint, so offline scoring and the streaming worker agree.
Where the forward runs (eager, or CUDA graphs over static batches) is the executor's
business: worker/executors.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from worker.checkpoint import Checkpoint, GoldenMismatch, Manifest, read_checkpoint
from worker.executors import GRAPH_MAX_ROWS, EagerExecutor, make_executor
from worker.executors import bucket_rows as bucket_rows  # re-exported: part of the scoring API
from worker.executors import pad_into as pad_into
from worker.model_config import ScoreKind

Precision = Literal["fp32", "bf16"]
Explain = Literal["all", "anomalies", "none"]

# Distances are computed for at most this many (row, reference row) pairs at once:
# rows are taken in chunks of KNN_PAIRS // reference_rows (16 MiB of float32 at most),
# so a batch's extra memory does not grow with its rows beyond its [B, k] results.
KNN_PAIRS = 1 << 22
# On CPU: chunks of at most KNN_CPU_PAIRS pairs (4 MiB, one buffer reused for all of a
# batch's chunks), and the k nearest selected in two levels, among groups of KNN_GROUP
# reference rows (nearest_neighbours). 64 rows a group: the second level's top-k then
# has at least 64·k candidates, where torch's CPU top-k takes its cheap partial-sort
# path (~2 ns a value, against ~12 below it; torch 2.13, tests/bench/knn.py).
KNN_CPU_PAIRS = 1 << 20
KNN_GROUP = 64


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


def nearest_neighbours(
    xs: torch.Tensor, reference: torch.Tensor, ref_sq: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest reference rows of each row: (Euclidean distances [B, k], indices
    [B, k]), both unsorted. Rows xs [B, D] and reference [M, D] in scaled units,
    ref_sq [M] = each reference row's squared norm.

    The candidates come from ‖r‖² − 2·x·r (the row's own ‖x‖² does not change its
    ranking) in chunks of rows, one matrix product and a top-k selection each; the k
    distances are then recomputed exactly from the differences, so a row's score does
    not carry the cancellation error of the expanded form. On CPU, with at least 3·k
    groups of KNN_GROUP reference rows (with fewer it gains nothing), the selection is
    two-level (`_two_level_topk`: the same values, a fraction of the cost); elsewhere
    one top-k over all M. Static shapes throughout, branches on shapes and device only
    (CUDA graphs).
    """
    m = reference.shape[0]
    on_cpu = xs.device.type == "cpu"
    groups = m // KNN_GROUP if on_cpu and m >= 3 * k * KNN_GROUP else 0
    chunk = max(1, min(KNN_PAIRS, KNN_CPU_PAIRS if on_cpu else KNN_PAIRS) // max(1, m))
    d2_buffer = xs.new_empty((min(chunk, xs.shape[0]), m)) if on_cpu else None
    dists, idx = [], []
    for start in range(0, xs.shape[0], chunk):
        x = xs[start : start + chunk]
        if d2_buffer is None:
            d2 = torch.addmm(ref_sq, x, reference.T, alpha=-2.0)
        else:
            d2 = torch.addmm(ref_sq, x, reference.T, alpha=-2.0, out=d2_buffer[: len(x)])
        if groups:
            i = _two_level_topk(d2, k, groups)
        else:
            i = torch.topk(d2, k, dim=1, largest=False, sorted=False).indices
        idx.append(i)
        nearest = reference.index_select(0, i.reshape(-1)).view(*i.shape, -1)
        dists.append(nearest.sub_(x[:, None, :]).square_().sum(dim=2).sqrt_())
    if len(idx) == 1:
        return dists[0], idx[0]
    if not idx:  # no rows
        return xs.new_empty((0, k)), torch.empty((0, k), dtype=torch.long, device=xs.device)
    return torch.cat(dists), torch.cat(idx)


def _two_level_topk(d2: torch.Tensor, k: int, groups: int) -> torch.Tensor:
    """Column indices [C, k] of the k smallest values in each row of d2 [C, M]: the same
    values as one top-k over M, at a fraction of its CPU cost.

    The first groups·KNN_GROUP columns form `groups` groups of KNN_GROUP adjacent
    columns; the remaining columns (fewer than KNN_GROUP) are always candidates. Let v
    be the row's k-th smallest value. A group whose minimum is below v is among the k
    groups with the smallest minima (else k groups would have minima below v: k values
    below v); if the k-th of those minima is above v, every group holding a value ≤ v
    is among them; else the k minima are k values ≤ v. Either way the members of those
    k groups and the remaining columns hold the row's k smallest values, so their top-k
    is exact (ties may pick other columns of equal value). Indices stay in [0, M)
    whatever the values, NaN included.
    """
    c, m = d2.shape
    s = KNN_GROUP
    width = groups * s
    g = torch.topk(
        d2[:, :width].view(c, groups, s).amin(dim=2), k, dim=1, largest=False, sorted=False
    ).indices
    # the chosen groups' members: blocks of s adjacent values of the (contiguous) d2,
    # copied by index_select from the view of every s-long window of it
    starts = g * s + torch.arange(0, c * m, m, device=d2.device)[:, None]
    windows = d2.contiguous().view(-1).unfold(0, s, 1)
    members = windows.index_select(0, starts.view(-1)).view(c, k * s)
    if width < m:
        members = torch.cat([members, d2[:, width:]], dim=1)
    p = torch.topk(members, k, dim=1, largest=False, sorted=False).indices
    # member p < k·s is member p % s of group g[p // s]: column g[p // s]·s + p % s
    col = torch.gather(g, 1, p.div(s, rounding_mode="floor").clamp_max_(k - 1)) * s + p % s
    if width < m:
        col = torch.where(p < k * s, col, p + (width - k * s))
    return col


class Scorer:
    """A verified model resident on one device, scoring whole batches at once.

    One forward computes everything a batch needs and packs it in one float32 tensor
    (score, p-value, then the top-k contributions, expected values and feature
    indices); `BatchScores` is unpacked from it in one place. The executor moves the
    rows in and the result out: eager, or static batches replaying CUDA graphs (by
    default on CUDA unless `cuda_graphs=False`; batches over `graph_max_rows` run
    eagerly). A Scorer is used by one thread at a time; its executor is its own.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device | str = "cpu",
        precision: Precision = "fp32",
        top_k: int = 3,
        cuda_graphs: bool = True,
        graph_max_rows: int = GRAPH_MAX_ROWS,
        executor: EagerExecutor | None = None,
    ):
        self.manifest: Manifest = checkpoint.manifest
        self.version = self.manifest.version
        self.device = torch.device(device)
        self.precision = precision
        self.top_k = min(top_k, self.manifest.input_dim)
        self.executor = executor or make_executor(self.device, cuda_graphs, graph_max_rows)
        if self.executor.device != self.device:
            raise ValueError(f"executor on {self.executor.device}, scorer on {self.device}")
        self.model = checkpoint.build_model(self.device)
        m = self.manifest
        # the features a stuck-feature check watches (Manifest.continuous), or None
        self.continuous = None if m.continuous is None else np.asarray(m.continuous, dtype=bool)
        # the knn score's reference rows, float32 whatever the model's precision
        self._k = m.neighbours
        self._reference = self.model.reference.float() if m.score == "knn" else None
        self._ref_sq = self._reference.square().sum(dim=1) if self._k else None
        if precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        f32 = dict(dtype=torch.float32, device=self.device)
        self._center = torch.tensor(m.scaler.center, **f32)
        self._inv_scale = 1.0 / torch.tensor(m.scaler.scale, **f32)
        self._scale = torch.tensor(m.scaler.scale, **f32)
        self._calibration = torch.tensor(m.calibration, **f32)
        # p-value of a score with `below` calibration scores under it: a table lookup;
        # beyond the tail's t (when the checkpoint has one), the tail's survival function
        n_cal = len(m.calibration)
        below = torch.arange(n_cal + 1, device=self.device)
        self._p_value_of = (n_cal - below + 1).float() / (n_cal + 1)
        self._tail = m.tail
        self.threshold = float(m.threshold)
        # decided in float32 on both sides: the forward picks the same rows to explain
        self._threshold = torch.tensor(self.threshold, **f32)
        self._threshold_f32 = np.float32(self.threshold)

    @property
    def input_dim(self) -> int:
        return self.manifest.input_dim

    @property
    def feature_names(self) -> list[str]:
        return self.manifest.feature_names

    # -- the maths (on the device) ---------------------------------------------------

    def _errors(self, xd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature squared error (scaled units, float32) and the reconstruction.
        The model runs in its precision; the residual is taken in float32."""
        xs = (xd - self._center) * self._inv_scale
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        recon = self.model(xs.to(dtype)).float()
        return (xs - recon).square(), recon

    def forward(self, xd: torch.Tensor, explain: Explain) -> torch.Tensor:
        """Packed float32 results for raw rows on the device, [B, 2] when explain is
        "none", else [B, 2 + 3k]: score, p-value, then the top-k contributions (share of
        the row's squared difference from its reconstruction, or for the knn score from
        the mean of its nearest reference rows), expected values (that reconstruction or
        mean, input units) and feature indices (exact in
        float32) of every row ("all") or of the anomalous rows only ("anomalies"; the
        others' explanation columns are zero)."""
        if self._reference is not None:
            xs = (xd - self._center) * self._inv_scale
            dist, index = nearest_neighbours(xs, self._reference, self._ref_sq, self._k)
            scores = dist.mean(dim=1)

            def explain_rows(rows: torch.Tensor | None) -> torch.Tensor:
                # against the mean of each row's nearest normal rows, computed for the
                # explained rows only
                x, i = (xs, index) if rows is None else (xs[rows], index[rows])
                mean = self._neighbour_mean(i)
                return self._explain((x - mean).square(), mean)
        else:
            err, recon = self._errors(xd)
            scores = errors_to_score(err, self.manifest.score)

            def explain_rows(rows: torch.Tensor | None) -> torch.Tensor:
                if rows is None:
                    return self._explain(err, recon)
                return self._explain(err.index_select(0, rows), recon.index_select(0, rows))

        cols = [scores[:, None], self._p_values(scores)[:, None]]
        if explain == "all":
            cols.append(explain_rows(None))
        elif explain == "anomalies":
            rows = torch.nonzero(scores >= self._threshold).squeeze(1)
            top = scores.new_zeros((len(scores), 3 * self.top_k))
            if len(rows):  # none anomalous (most small batches): nothing to explain
                top.index_copy_(0, rows, explain_rows(rows))
            cols.append(top)
        return torch.cat(cols, dim=1)

    def _neighbour_mean(self, index: torch.Tensor) -> torch.Tensor:
        """[E, D]: the mean of each row's k reference rows (index [E, k]), one gathered
        [E, D] at a time (never [E, k, D]: batches of float32-rows records are large)."""
        mean = self._reference.index_select(0, index[:, 0])
        for j in range(1, index.shape[1]):
            mean = mean + self._reference.index_select(0, index[:, j])
        return mean / index.shape[1]

    def _p_values(self, scores: torch.Tensor) -> torch.Tensor:
        """P(a normal row scores ≥ score): empirical up to the tail's t, the GPD tail's
        survival beyond it (so p-values keep falling past the largest held-out score);
        never below float32's smallest normal number (docs/contract.md#anomaly-events)."""
        below = torch.searchsorted(self._calibration, scores, side="left")
        p = self._p_value_of.take(below)
        if self._tail is not None:
            p = torch.where(scores > self._tail.t, self._tail.survival(scores), p)
        return p.clamp_min(torch.finfo(torch.float32).tiny)

    def _explain(self, err: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """[E, 3k]: each row's top-k contributions, expected values and feature indices."""
        top_err, top_idx = torch.topk(err, self.top_k, dim=1)
        total = err.sum(dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
        expected = torch.gather(recon * self._scale + self._center, 1, top_idx)
        return torch.cat([top_err.div_(total), expected, top_idx.float()], dim=1)

    # -- public API ------------------------------------------------------------------

    @torch.inference_mode()
    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """The model's reconstruction of raw rows, in input units (float32 [B, D])."""
        xd = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        _, recon = self._errors(xd)
        return (recon * self._scale + self._center).cpu().numpy()

    @torch.inference_mode()
    def score_batch(self, x: np.ndarray, explain: Explain = "all") -> BatchScores:
        """Score B raw rows (float32 [B, D], input units).

        `explain` chooses the rows that get their top contributing features: every
        row, only the anomalous ones (what the worker publishes by default), or none.
        """
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected rows of {self.input_dim} features, got shape {x.shape}")
        if explain == "anomalies" and not self.executor.explains_selectively:
            packed = self.executor.score(self.forward, x, "all")  # static shapes
        else:
            packed = self.executor.score(self.forward, x, explain)
        return self._batch_scores(packed, explain)

    def _batch_scores(self, packed: np.ndarray, explain: Explain) -> BatchScores:
        """BatchScores from the forward's packed results (host, [B, 2] or [B, 2 + 3k])."""
        k = self.top_k
        is_anomaly = packed[:, 0] >= self._threshold_f32
        rows = _explained_rows(explain, is_anomaly)
        top = packed[rows] if explain != "none" else np.empty((0, 2 + 3 * k), np.float32)
        return BatchScores(
            scores=np.ascontiguousarray(packed[:, 0]),
            p_values=np.ascontiguousarray(packed[:, 1]),
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


def golden_tolerance(device: torch.device, precision: Precision, want: np.ndarray) -> np.ndarray:
    """Per-row absolute tolerance for reproducing the trainer's golden scores `want`
    (float32 on CPU) on this device and precision.

    bf16 keeps 8 significant bits: a row's score moves by a few of its rounding steps
    relative to the size of the scores themselves (the residual of a well fitted model
    is small beside the rows it reconstructs), so the tolerance is 16 bf16 epsilons of
    the row's score plus the batch's mean score (measured on CPU: at most 4)."""
    if precision == "bf16":
        eps = torch.finfo(torch.bfloat16).eps
        return 16 * eps * (np.abs(want) + np.abs(want).mean())
    rtol, atol = (1e-5, 1e-7) if device.type == "cpu" else (1e-3, 1e-6)
    return atol + rtol * np.abs(want)


def verify_golden(scorer: Scorer) -> None:
    """The golden batch must reproduce on the scorer's device and precision, as is and,
    tiled, in every static batch the executor can build (which builds them all, CUDA
    graphs captured: on a load, before the swap)."""
    g = scorer.manifest.golden
    inputs = np.asarray(g.inputs, dtype=np.float32)
    for n in dict.fromkeys([len(inputs), *scorer.executor.all_bucket_sizes()]):
        rows = np.arange(n) % len(inputs)
        got = scorer.score_batch(inputs[rows]).scores.astype(np.float64)
        want = np.asarray(g.scores, dtype=np.float64)[rows]
        excess = np.abs(got - want) - golden_tolerance(scorer.device, scorer.precision, want)
        if not (excess <= 0).all():  # NaN counts as off
            worst = int(np.argmax(np.nan_to_num(excess, nan=np.inf)))
            raise GoldenMismatch(
                f"{scorer.version}: golden row {rows[worst]} scores {got[worst]:.6g} on "
                f"{scorer.device} (batch of {n}), checkpoint says {want[worst]:.6g}"
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
