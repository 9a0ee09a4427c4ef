"""The GPU scoring path's shared pieces, checked on CPU: buckets, padding, the packed
forward through static batches (StaticBatchExecutor, eager on CPU) and its unpacking,
the fallback when a capture is refused, no reference cycles (GPU memory is freed on a
swap), and the bf16 agreement check. CUDA graph capture itself runs only in
tests/bench/gpu.py.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bench._scoring_tools import precision_agreement, score_tensor
from training.fit import FitResult, TrainConfig, fit
from worker import executors
from worker.checkpoint import Checkpoint
from worker.executors import GRAPH_MAX_ROWS, EagerExecutor, StaticBatchExecutor
from worker.scoring import Scorer, bucket_rows, pad_into

D = 6


def rows(n: int, seed: int, anomalies: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    x[:, 1] += x[:, 0]
    if anomalies:  # ~10% far off, so "anomalies" explains some rows and not others
        x[rng.random(n) < 0.1, 2] += 12.0
    return x


@pytest.fixture(scope="module")
def fitted() -> FitResult:
    return fit(
        rows(300, 0, anomalies=False),
        [f"f{i}" for i in range(D)],
        TrainConfig(max_epochs=3, seed=0, target_fpr=0.05),  # 75 held-out rows support ≥ 1/76
    )


def checkpoint(fitted: FitResult) -> Checkpoint:
    return Checkpoint(
        path=Path("."), manifest=fitted.manifest, state_dict=fitted.model.state_dict()
    )


def static_scorer(fitted: FitResult, max_rows: int = GRAPH_MAX_ROWS, **kw) -> Scorer:
    """A CPU scorer on the CUDA code path: the packed forward, explaining every row,
    through padded static batches (run eagerly on CPU: there is nothing to capture)."""
    executor = StaticBatchExecutor("cpu", max_rows)
    return Scorer(checkpoint(fitted), device="cpu", executor=executor, **kw)


def test_bucket_rows():
    assert [bucket_rows(n) for n in (1, 63, 64, 65, 1000, 1024, 1025)] == [
        64,
        64,
        64,
        128,
        1024,
        1024,
        2048,
    ]
    assert bucket_rows(GRAPH_MAX_ROWS) == GRAPH_MAX_ROWS
    assert bucket_rows(GRAPH_MAX_ROWS + 1) is None
    assert bucket_rows(0) is None
    assert bucket_rows(100, max_rows=64) is None
    assert bucket_rows(3, max_rows=1024, min_rows=1) == 4


def test_pad_into_copies_the_rows_and_zeroes_the_rest():
    buf = torch.full((8, 3), 7.0)
    x = torch.arange(9, dtype=torch.float32).reshape(3, 3)
    out = pad_into(buf, x)
    assert out is buf
    assert torch.equal(buf[:3], x) and not buf[3:].any()
    pad_into(buf, x[:1])  # a smaller batch after a bigger one leaves no stale row
    assert torch.equal(buf[:1], x[:1]) and not buf[1:].any()


@pytest.mark.parametrize("explain", ["all", "anomalies", "none"])
def test_padded_static_path_equals_the_cpu_path(fitted, explain):
    plain = fitted.scorer()
    static = static_scorer(fitted)
    explained = 0
    # 1 and 50 share the 64-row bucket (reused), 64 fills it exactly, 65 and 200 pad up.
    for n in (50, 1, 64, 65, 200, 50):
        x = rows(n, seed=n)
        want = plain.score_batch(x, explain=explain)
        got = static.score_batch(x, explain=explain)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got.p_values, want.p_values)
        np.testing.assert_array_equal(got.is_anomaly, want.is_anomaly)
        np.testing.assert_array_equal(got.explained, want.explained)
        np.testing.assert_array_equal(got.top_index, want.top_index)
        np.testing.assert_allclose(got.top_contribution, want.top_contribution, rtol=1e-5)
        np.testing.assert_allclose(got.top_expected, want.top_expected, rtol=1e-5, atol=1e-6)
        assert got.top_index.dtype == want.top_index.dtype == np.int64
        assert got.top_contribution.dtype == np.float32
        assert got.top_index.shape == want.top_index.shape
        explained += len(got.explained)
    assert static.executor.bucket_sizes == {64, 128, 256}
    if explain == "anomalies":
        assert 0 < explained < 50 + 1 + 64 + 65 + 200 + 50


def test_batches_over_the_largest_bucket_score_eagerly(fitted):
    static = static_scorer(fitted, max_rows=64)
    x = rows(100, seed=3)
    got = static.score_batch(x)
    assert static.executor.bucket_sizes == set()
    np.testing.assert_allclose(got.scores, fitted.scorer().score_batch(x).scores, rtol=1e-6)


def test_score_tensor_through_static_batches(fitted):
    static = static_scorer(fitted)
    x = rows(100, seed=4)
    want = score_tensor(fitted.scorer(), torch.from_numpy(x))
    got = score_tensor(static, torch.from_numpy(x))
    assert got.shape == (100,) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    again = score_tensor(static, torch.from_numpy(x[:10]))  # the first result is not a live view
    torch.testing.assert_close(got[:10], again, rtol=1e-6, atol=1e-7)


def test_a_dropped_scorer_is_freed_without_a_garbage_collection(fitted):
    """No reference cycle: the worker's swap (self.scorer = new) frees the old model's
    (GPU) memory at once, not at the next gc."""
    static = static_scorer(fitted)
    static.score_batch(rows(70, seed=5))
    score_tensor(static, torch.from_numpy(rows(10, seed=6)))
    ref = weakref.ref(static)
    gc.disable()
    try:
        del static
        assert ref() is None
    finally:
        gc.enable()


def test_a_refused_capture_falls_back_to_eager_scoring(fitted, monkeypatch):
    def refuse(*_args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(executors, "capture_graph", refuse)
    monkeypatch.setattr(executors, "CaptureSide", lambda device: object())  # no CUDA here
    static = Scorer(checkpoint(fitted), executor=StaticBatchExecutor("cpu", capture=True))
    x = rows(70, seed=8)
    got = static.score_batch(x)
    assert not static.executor.static and static.executor.bucket_sizes == set()
    np.testing.assert_allclose(got.scores, fitted.scorer().score_batch(x).scores, rtol=1e-6)
    static.score_batch(x)  # and stays eager: no second capture
    assert not static.executor.static


def test_the_default_executor_follows_device_and_cuda_graphs(fitted):
    cpu = Scorer(checkpoint(fitted), device="cpu")
    assert type(cpu.executor) is EagerExecutor and cpu.executor.explains_selectively
    assert not StaticBatchExecutor("cpu").explains_selectively
    with pytest.raises(ValueError, match="executor"):
        Scorer(checkpoint(fitted), device="cpu", executor=EagerExecutor("meta"))


def test_precision_agreement():
    ref = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    same = precision_agreement(ref, ref, threshold=2.5)
    assert same["max_rel_error"] == 0 and same["spearman"] == pytest.approx(1.0)
    assert same["decision_agreement"] == 1.0 and same["flagged_reference"] == 2
    moved = precision_agreement(ref, np.array([1.0, 2.6, 2.4, 4.0]), threshold=2.5)
    assert moved["flips_to_anomaly"] == 1 and moved["flips_to_normal"] == 1
    assert moved["decision_agreement"] == 0.5
    assert moved["max_rel_error"] == pytest.approx(0.3)
    with pytest.raises(ValueError):
        precision_agreement(ref, ref[:2], threshold=1.0)


def test_bf16_agrees_with_fp32_on_cpu(fitted):
    x = rows(2000, seed=7)
    fp32 = fitted.scorer().score_batch(x, explain="none").scores
    bf16 = Scorer(checkpoint(fitted), precision="bf16").score_batch(x, explain="none")
    agreement = precision_agreement(fp32, bf16.scores, fitted.manifest.threshold)
    assert agreement["spearman"] > 0.99
    assert agreement["decision_agreement"] > 0.98
