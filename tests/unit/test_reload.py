"""CheckpointWatcher: every version that fails to load is refused, logged and counted,
and the watching goes on; a hostile architecture is refused before it is allocated."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.support import wait_for
from training.fit import FitResult, TrainConfig, fit
from worker import reload
from worker.checkpoint import MANIFEST_FILE, ShapeMismatch, publish, read_checkpoint
from worker.metrics import WorkerMetrics
from worker.reload import CheckpointWatcher

HUGE = 10**11  # code width: 25.6 TB of float32 weights per layer if it were ever built


@pytest.fixture(scope="module")
def fitted() -> FitResult:
    x = np.random.default_rng(0).normal(size=(80, 4)).astype(np.float32)
    # 20 held-out rows: the lowest target they support is 1/21
    return fit(x, ["a", "b", "c", "d"], TrainConfig(max_epochs=2, seed=0, target_fpr=0.05))


def watcher(model_dir: Path, **kw) -> CheckpointWatcher:
    return CheckpointWatcher(model_dir, "cpu", "fp32", poll_s=0.02, metrics=WorkerMetrics(), **kw)


def refusals(w: CheckpointWatcher, reason: str) -> float | None:
    return w.metrics.registry.get_sample_value(
        "cae_model_reloads_total", {"result": "refused", "reason": reason}
    )


def publish_huge_architecture(model_dir: Path, fitted: FitResult) -> str:
    """A published version whose manifest declares a code width its weights lack."""
    version = publish(model_dir, fitted.model, fitted.manifest)
    path = model_dir / version / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["architecture"]["code_dim"] = HUGE
    path.write_text(json.dumps(manifest))
    return version


def wait_until(pred):
    return wait_for(pred, timeout_s=20.0, interval_s=0.02, what="the watcher")


def test_huge_architecture_is_a_shape_mismatch_read_from_the_header(tmp_path, fitted):
    version = publish_huge_architecture(tmp_path, fitted)
    with pytest.raises(ShapeMismatch, match=f"expected \\({HUGE}, 4\\)"):
        read_checkpoint(tmp_path / version)  # allocating it would fail with RuntimeError


def test_huge_architecture_is_refused_and_counted(tmp_path, fitted):
    version = publish_huge_architecture(tmp_path, fitted)
    w = watcher(tmp_path)
    with capture_logs() as logs:
        assert w.check_once() is None
    assert w.refused == {version: "ShapeMismatch"}
    assert refusals(w, "ShapeMismatch") == 1
    (refused,) = [e for e in logs if e["event"] == "model_refused"]
    assert refused["reason"] == "ShapeMismatch" and refused["exc_info"] is None


def test_any_failure_to_load_is_refused_and_the_next_version_is_served(
    tmp_path, fitted, monkeypatch
):
    """Out of memory, a driver error, a file pruned mid-read: not a CheckpointError, still
    a refusal, and the watcher's thread goes on to the next version."""
    real = reload.load_scorer

    def load_scorer(version_dir, *args, **kw):
        if version_dir.name == bad:
            raise RuntimeError("can't allocate memory")
        return real(version_dir, *args, **kw)

    monkeypatch.setattr(reload, "load_scorer", load_scorer)
    w = watcher(tmp_path, top_k=2).start()
    try:
        bad = publish(tmp_path, fitted.model, fitted.manifest)
        wait_until(lambda: bad in w.refused)
        assert w.alive
        good = publish(tmp_path, fitted.model, fitted.manifest)
        scorer = wait_until(w.take)
    finally:
        w.stop()
    assert w.refused == {bad: "RuntimeError"}
    assert refusals(w, "RuntimeError") == 1
    assert scorer.version == good
    assert scorer.top_k == 2  # WORKER_TOP_FEATURES reaches the scorer
    golden = np.asarray(fitted.manifest.golden.inputs, dtype=np.float32)
    assert scorer.score_batch(golden).top_index.shape[1] == 2


def test_a_version_refused_for_the_machines_sake_is_tried_again(tmp_path, fitted, monkeypatch):
    real = reload.load_scorer
    failures = {"left": 1}

    def load_scorer(*args, **kw):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("CUDA out of memory")
        return real(*args, **kw)

    monkeypatch.setattr(reload, "load_scorer", load_scorer)
    version = publish(tmp_path, fitted.model, fitted.manifest)
    w = watcher(tmp_path)
    w.retry_after_s = 0.1
    assert w.check_once() is None and w.refused == {version: "RuntimeError"}
    assert w.check_once() is None, "not before the retry delay"
    time.sleep(0.15)
    assert w.check_once().version == version


def test_a_checkpoint_error_is_not_tried_again(tmp_path, fitted):
    publish_huge_architecture(tmp_path, fitted)
    w = watcher(tmp_path)
    w.retry_after_s = 0.0
    assert w.check_once() is None
    assert w.check_once() is None
    assert refusals(w, "ShapeMismatch") == 1


def test_an_unreadable_latest_is_refused_once(tmp_path):
    (tmp_path / "LATEST").write_bytes(b"\xff\xfe not text")
    w = watcher(tmp_path)
    assert w.check_once() is None and w.check_once() is None
    assert w.refused == {"<LATEST>": "UnicodeDecodeError"}
    assert refusals(w, "UnicodeDecodeError") == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_alive_until_the_thread_ends_unexpectedly(tmp_path, monkeypatch):
    w = watcher(tmp_path)
    assert w.alive  # not started yet
    w.start()
    assert w.alive
    w.stop()
    assert w.alive  # stopped on request

    def fatal():
        raise SystemExit  # not an Exception: nothing in the loop catches it

    dying = watcher(tmp_path)
    monkeypatch.setattr(dying, "check_once", fatal)
    dying.start()
    wait_until(lambda: not dying.alive)
