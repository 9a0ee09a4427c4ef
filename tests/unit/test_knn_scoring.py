"""The default score (knn): the mean distance to the k nearest reference rows stored in
the checkpoint, against a brute-force computation; the two-level nearest-neighbour
selection against brute force and a single top-k, ties and odd sizes included; chunked
like unchunked; through the static batches the CUDA path uses; its explanation; and the
leave-one-out calibration scores of held-out rows that are themselves reference rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.fit import FitResult, TrainConfig, apply_scaler, fit, leave_one_out_scores
from worker import scoring
from worker.checkpoint import Checkpoint
from worker.executors import StaticBatchExecutor
from worker.scoring import Scorer, nearest_neighbours

D, K = 5, 5


def rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    x[:, 1] += 2 * x[:, 0]
    return x * np.array([1, 3, 0.5, 10, 1], dtype=np.float32) + 4


def brute_force(x_scaled: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((x_scaled[:, None, :] - reference[None, :, :]) ** 2).sum(axis=2))
    return np.sort(d, axis=1)[:, :k].mean(axis=1)


@pytest.fixture(scope="module")
def fitted() -> FitResult:
    # 240 normal rows, reference capped at 150: some held-out rows are reference rows
    # (scored leaving themselves out), the others are not
    config = TrainConfig(max_epochs=3, seed=0, target_fpr=0.05, reference_rows=150)
    return fit(rows(240, 0), [f"f{i}" for i in range(D)], config)


def scorer_of(fitted: FitResult, **kw) -> Scorer:
    ckpt = Checkpoint(
        path=Path("."), manifest=fitted.manifest, state_dict=fitted.model.state_dict()
    )
    return Scorer(ckpt, device="cpu", **kw)


def test_the_default_checkpoint_stores_its_reference_rows(fitted):
    m = fitted.manifest
    assert m.score == "knn" and m.neighbours == K
    assert m.architecture.reference_rows == 150
    reference = fitted.model.state_dict()["reference"]
    assert reference.shape == (150, D)
    # scaled training rows: about zero mean and unit spread per feature
    assert np.abs(reference.numpy().mean(axis=0)).max() < 0.3
    assert np.abs(reference.numpy().std(axis=0) - 1).max() < 0.3


def test_knn_score_is_the_mean_distance_to_the_k_nearest_reference_rows(fitted):
    x = rows(300, 7)
    x[:10, 3] += 80.0  # far off on one feature
    got = scorer_of(fitted).score_batch(x, explain="none").scores
    reference = fitted.model.state_dict()["reference"].numpy()
    want = brute_force(apply_scaler(x, fitted.manifest.scaler), reference, K)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got[:10].min() > got[10:].max()


def test_chunked_and_static_batches_score_alike(fitted, monkeypatch):
    x = rows(333, 8)
    eager = scorer_of(fitted).score_batch(x)
    monkeypatch.setattr(scoring, "KNN_PAIRS", 150 * 16)  # chunks of 16 rows
    chunked = scorer_of(fitted).score_batch(x)
    static = scorer_of(fitted, executor=StaticBatchExecutor("cpu")).score_batch(x)
    for other in (chunked, static):
        np.testing.assert_allclose(other.scores, eager.scores, rtol=1e-6, atol=1e-6)
        assert np.array_equal(other.top_index, eager.top_index)


def test_an_empty_batch_scores_to_empty_results(fitted):
    # a batch whose every record was rejected, or an empty file, scores to nothing
    for explain in ("all", "anomalies", "none"):
        got = scorer_of(fitted).score_batch(np.empty((0, D), np.float32), explain=explain)
        assert got.scores.shape == got.p_values.shape == got.is_anomaly.shape == (0,)
    dist, index = nearest_neighbours(torch.empty(0, D), torch.zeros(150, D), torch.zeros(150), K)
    assert dist.shape == index.shape == (0, K) and index.dtype == torch.long


def test_explanation_is_the_difference_from_the_nearest_rows_mean(fitted):
    x = rows(50, 9)
    x[0, 3] += 80.0
    got = scorer_of(fitted, top_k=D).score_batch(x[:1])
    reference = fitted.model.state_dict()["reference"].numpy()
    xs = apply_scaler(x[:1], fitted.manifest.scaler)
    d = np.sqrt(((xs - reference) ** 2).sum(axis=1))
    # the neighbours of a row 80 units off on f3 are still chosen by all features; their
    # mean, back in input units, is what the event calls "expected"
    mean = reference[np.argsort(d)[:K]].mean(axis=0)
    scale = np.asarray(fitted.manifest.scaler.scale, dtype=np.float32)
    center = np.asarray(fitted.manifest.scaler.center, dtype=np.float32)
    assert got.top_index[0, 0] == 3
    order = got.top_index[0]
    np.testing.assert_allclose(got.top_expected[0], (mean * scale + center)[order], rtol=1e-4)
    share = (xs[0] - mean) ** 2 / ((xs[0] - mean) ** 2).sum()
    np.testing.assert_allclose(got.top_contribution[0], share[order], rtol=1e-4, atol=1e-6)


def test_held_out_reference_rows_are_scored_without_themselves():
    x = rows(40, 3)
    config = TrainConfig(max_epochs=2, seed=1, target_fpr=0.1, reference_rows=30)
    result = fit(x, [f"f{i}" for i in range(D)], config)
    scorer = scorer_of(result)
    reference = result.model.state_dict()["reference"].numpy()
    ref_idx = np.flatnonzero(
        [
            np.isclose(reference, r, atol=1e-6).all(axis=1).any()
            for r in apply_scaler(x, result.manifest.scaler)
        ]
    )
    assert len(ref_idx) == 30
    hold_idx = np.arange(40)  # every row, reference or not
    got = leave_one_out_scores(scorer, x[hold_idx], hold_idx, ref_idx)
    xs = apply_scaler(x, result.manifest.scaler)
    for i in hold_idx:
        others = np.delete(reference, np.flatnonzero(ref_idx == i), axis=0)
        assert got[i] == pytest.approx(brute_force(xs[i : i + 1], others, K)[0], rel=1e-5)
    assert got.min() > 0.05  # no row is its own neighbour


def knn_case(b: int, m: int, d: int, seed: int, lattice: bool = False):
    """Rows [b, d] and reference rows [m, d] (with their squared norms); `lattice`: small
    integers, so many distances tie exactly, and every third reference row repeated."""
    g = torch.Generator().manual_seed(seed)
    if lattice:
        xs = torch.randint(-2, 3, (b, d), generator=g).float()
        ref = torch.randint(-2, 3, (m, d), generator=g).float()
        ref[2::3] = ref[0 : len(ref[2::3]) * 3 : 3]
    else:
        xs = torch.randn(b, d, generator=g)
        ref = torch.randn(m, d, generator=g)
    return xs, ref, ref.square().sum(dim=1)


def check_against_brute_force(xs, ref, ref_sq, k) -> torch.Tensor:
    dist, idx = nearest_neighbours(xs, ref, ref_sq, k)
    assert dist.shape == idx.shape == (len(xs), k)
    assert ((idx >= 0) & (idx < len(ref))).all()
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct reference rows
    want = torch.cdist(xs.double(), ref.double()).sort(dim=1).values[:, :k]
    # the k smallest distances, and the returned ones are the distances to those rows
    torch.testing.assert_close(dist.double().sort(dim=1).values, want, rtol=1e-5, atol=1e-5)
    own = (xs[:, None, :].double() - ref[idx].double()).square().sum(dim=2).sqrt()
    torch.testing.assert_close(dist.double(), own, rtol=1e-5, atol=1e-5)
    return idx


@pytest.mark.parametrize(
    ("b", "m", "d", "k", "group"),
    [
        (600, 2048, 64, 5, None),  # the default size and group, several chunks
        (257, 1000, 16, 5, None),  # 15 groups of 64 and 40 rows left over
        (40, 113, 7, 6, 4),  # 28 groups of 4 and 1 row left over
        (40, 95, 7, 6, 8),  # fewer than 3·k groups: one top-k over M
        (30, 100, 5, 1, 8),  # k = 1
        (20, 5, 3, 5, None),  # M = k
        (1, 2048, 64, 5, None),  # one row
        (1, 37, 4, 5, 2),
    ],
)
@pytest.mark.parametrize("lattice", [False, True], ids=["random", "ties"])
def test_nearest_neighbours_are_the_brute_force_ones(b, m, d, k, group, lattice, monkeypatch):
    if group is not None:
        monkeypatch.setattr(scoring, "KNN_GROUP", group)
    check_against_brute_force(*knn_case(b, m, d, seed=b + m + d + k, lattice=lattice), k)


def test_two_level_selection_picks_what_one_top_k_picks(monkeypatch):
    xs, ref, ref_sq = knn_case(700, 2040, 32, seed=5)  # no ties; 2040 = 31 · 64 + 56
    calls = []
    two_level = scoring._two_level_topk
    monkeypatch.setattr(scoring, "_two_level_topk", lambda *a: calls.append(a) or two_level(*a))
    dist, idx = nearest_neighbours(xs, ref, ref_sq, 5)
    assert len(calls) == 2  # chunks of 514 rows, each through the two levels
    monkeypatch.setattr(scoring, "KNN_GROUP", 4096)  # no groups: one top-k over M
    one_dist, one_idx = nearest_neighbours(xs, ref, ref_sq, 5)
    assert torch.equal(idx.sort(dim=1).values, one_idx.sort(dim=1).values)
    assert torch.equal(dist.sort(dim=1).values, one_dist.sort(dim=1).values)


def test_nearest_neighbours_of_a_nan_row_are_reference_rows():
    xs, ref, ref_sq = knn_case(3, 2048, 8, seed=1)
    xs[1, 2] = float("nan")
    dist, idx = nearest_neighbours(xs, ref, ref_sq, 5)
    assert ((idx >= 0) & (idx < len(ref))).all()
    assert dist[1].isnan().all() and not dist[[0, 2]].isnan().any()
