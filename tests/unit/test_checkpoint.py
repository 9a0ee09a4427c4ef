"""Checkpoint format: exact round trip, atomic publication, pruning, and every refusal."""

from __future__ import annotations

import io
import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from tests.conftest import TINY_FEATURES
from tests.support import PickleCanary, plant_pickle
from training.fit import TrainConfig, fit
from worker.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    GoldenMismatch,
    IntegrityError,
    ManifestInvalid,
    NonFiniteWeights,
    ShapeMismatch,
    UnsafePayload,
    list_versions,
    prune,
    publish,
    read_checkpoint,
    read_latest,
    sha256_bytes,
)
from worker.model import CAEConfig, ContractiveAutoencoder
from worker.scoring import load_scorer

TAIL = {"t": 1.0, "sigma": 0.2, "gamma": 0.1, "n_peaks": 50, "n": 1000}


@pytest.fixture
def version_dir(tmp_path, tiny_model) -> Path:
    return tmp_path / publish(tmp_path, tiny_model.model, tiny_model.manifest)


def rewrite(version_dir: Path, weights: bytes | None = None, **manifest_changes) -> None:
    """Replace the weights and/or manifest fields; the sha256 follows new weights."""
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    if weights is not None:
        (version_dir / WEIGHTS_FILE).write_bytes(weights)
        manifest["weights_sha256"] = sha256_bytes(weights)
    manifest.update(manifest_changes)
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def state_of(version_dir: Path) -> dict[str, torch.Tensor]:
    return dict(read_checkpoint(version_dir).state_dict)


def test_round_trip_scores_are_bitwise_identical(version_dir, tiny_model, tiny_rows):
    scorer = load_scorer(version_dir)
    want = tiny_model.scorer().score_batch(tiny_rows)
    got = scorer.score_batch(tiny_rows)
    assert np.array_equal(got.scores, want.scores)
    assert np.array_equal(got.p_values, want.p_values)
    assert scorer.manifest.version == version_dir.name
    assert sorted(p.name for p in version_dir.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]


def test_reader_never_sees_a_half_written_version(tmp_path, tiny_model):
    model = ContractiveAutoencoder(tiny_model.model.config)
    model.load_state_dict(tiny_model.model.state_dict())
    stop, seen, errors = threading.Event(), set(), []

    def reader() -> None:
        while not stop.is_set():
            try:
                version = read_latest(tmp_path)
                if version is not None:
                    read_checkpoint(tmp_path / version)
                    seen.add(version)
            except Exception as e:  # any error at all fails the test
                errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(50):
            with torch.no_grad():  # new weights each time: a mixed-up pair fails the sha256
                model.encoder_linears[0].bias.fill_(i / 50)
            publish(tmp_path, model, tiny_model.manifest, keep=1000)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(list_versions(tmp_path)) == 50
    assert len(seen) > 1


def test_prune_keeps_the_newest_and_never_the_live_one(tmp_path, tiny_model):
    published = [publish(tmp_path, tiny_model.model, tiny_model.manifest, keep=3) for _ in range(5)]
    assert list_versions(tmp_path) == published[-3:]
    assert read_latest(tmp_path) == published[-1]
    (tmp_path / "LATEST").write_text(published[-3] + "\n")  # operator rolled back
    assert prune(tmp_path, keep=1) == [published[-2]]
    assert list_versions(tmp_path) == [published[-3], published[-1]]


def test_failed_verification_leaves_latest_alone(tmp_path, tiny_model):
    first = publish(tmp_path, tiny_model.model, tiny_model.manifest)

    def refuse(version_dir: Path) -> None:
        raise GoldenMismatch(f"{version_dir.name}: refused by the test")

    with pytest.raises(GoldenMismatch):
        publish(tmp_path, tiny_model.model, tiny_model.manifest, verify=refuse)
    assert read_latest(tmp_path) == first
    assert list_versions(tmp_path) == [first]


def test_truncated_weights(version_dir):
    data = (version_dir / WEIGHTS_FILE).read_bytes()
    (version_dir / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="sha256"):
        read_checkpoint(version_dir)
    rewrite(version_dir, weights=data[: len(data) // 2])  # even with a matching sha256
    with pytest.raises(IntegrityError, match="safetensors"):
        read_checkpoint(version_dir)


def test_tampered_byte(version_dir):
    data = bytearray((version_dir / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x01
    (version_dir / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        read_checkpoint(version_dir)


def test_missing_manifest(version_dir):
    (version_dir / MANIFEST_FILE).unlink()
    with pytest.raises(ManifestInvalid, match="missing"):
        read_checkpoint(version_dir)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda m: "{not json", id="bad-json"),
        pytest.param(
            lambda m: {k: v for k, v in m.items() if k != "threshold"}, id="missing-field"
        ),
        pytest.param(lambda m: {**m, "threshold": "high"}, id="wrong-type"),
        pytest.param(lambda m: {**m, "input_dim": 5}, id="inconsistent-dims"),
        pytest.param(lambda m: {**m, "feature_names": ["a", "a", "b", "c"]}, id="duplicate-names"),
        pytest.param(lambda m: {**m, "threshold_method": "guess"}, id="unknown-method"),
        pytest.param(lambda m: {**m, "threshold_method": "gpd", "tail": None}, id="gpd-no-tail"),
        pytest.param(lambda m: {**m, "tail": {**TAIL, "sigma": 0.0}}, id="tail-sigma-0"),
        pytest.param(lambda m: {**m, "tail": {**TAIL, "n_peaks": 1000}}, id="tail-all-peaks"),
        pytest.param(lambda m: {**m, "tail": {**TAIL, "t": "inf"}}, id="tail-t-inf"),
        pytest.param(
            lambda m: {**m, "threshold_method": "gpd", "threshold": 0.5, "tail": TAIL},
            id="gpd-threshold-below-t",
        ),
    ],
)
def test_malformed_manifest(version_dir, corrupt):
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    bad = corrupt(manifest)
    (version_dir / MANIFEST_FILE).write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(ManifestInvalid):
        read_checkpoint(version_dir)


def test_a_manifest_from_before_tails_loads_with_empirical_p_values(version_dir):
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    old = {k: v for k, v in manifest.items() if k not in ("threshold_method", "tail")}
    (version_dir / MANIFEST_FILE).write_text(json.dumps(old))
    scorer = load_scorer(version_dir)
    assert scorer.manifest.threshold_method == "empirical" and scorer.manifest.tail is None
    far = np.full((1, scorer.input_dim), 1e3, dtype=np.float32)
    assert scorer.score_batch(far).p_values[0] == pytest.approx(1 / (len(old["calibration"]) + 1))


def test_a_gpd_manifest_round_trips(version_dir):
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    tail = {**TAIL, "t": manifest["threshold"] / 2}
    (version_dir / MANIFEST_FILE).write_text(
        json.dumps({**manifest, "threshold_method": "gpd", "target_fpr": 0.01, "tail": tail})
    )
    m = read_checkpoint(version_dir).manifest
    assert m.threshold_method == "gpd" and m.tail.model_dump() == tail


def test_weights_of_another_architecture(version_dir, tiny_model):
    arch = tiny_model.model.config
    other = ContractiveAutoencoder(CAEConfig(input_dim=arch.input_dim, code_dim=arch.code_dim + 3))
    rewrite(version_dir, weights=st_save(other.state_dict()))
    with pytest.raises(ShapeMismatch, match="do not fit the architecture"):
        read_checkpoint(version_dir)


def test_non_finite_weights(version_dir):
    state = state_of(version_dir)
    name = next(iter(state))
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    rewrite(version_dir, weights=st_save(state))
    with pytest.raises(NonFiniteWeights, match=name):
        read_checkpoint(version_dir)


def test_golden_batch_that_does_not_reproduce(version_dir):
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    golden = manifest["golden"]
    rewrite(version_dir, golden={**golden, "scores": [s * 1.01 + 1e-3 for s in golden["scores"]]})
    read_checkpoint(version_dir)  # the files are intact; only the scores disagree
    with pytest.raises(GoldenMismatch):
        load_scorer(version_dir)


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_as_weights_is_refused_and_never_unpickled(version_dir, tmp_path, protocol):
    marker = tmp_path / "unpickled"
    plant_pickle(version_dir, marker, "weights", protocol)
    with pytest.raises(UnsafePayload, match="pickle"):
        load_scorer(version_dir)
    assert not marker.exists()


def test_torch_save_as_weights_is_refused_and_never_unpickled(version_dir, tmp_path):
    marker = tmp_path / "unpickled"
    rewrite(version_dir, weights=torch_save_bytes({"state": PickleCanary(marker)}))
    with pytest.raises(UnsafePayload):
        load_scorer(version_dir)
    assert not marker.exists()


def test_stray_pickle_file_is_refused(version_dir, tmp_path):
    marker = tmp_path / "unpickled"
    (version_dir / "model.pt").write_bytes(torch_save_bytes(PickleCanary(marker)))
    with pytest.raises(UnsafePayload, match="model.pt"):
        read_checkpoint(version_dir)
    assert not marker.exists()


def test_every_refusal_is_a_checkpoint_error():
    for cls in (
        IntegrityError,
        ManifestInvalid,
        NonFiniteWeights,
        ShapeMismatch,
        UnsafePayload,
        GoldenMismatch,
    ):
        assert issubclass(cls, CheckpointError)


def test_knn_reference_rows_are_shape_checked(version_dir):
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    assert manifest["score"] == "knn" and manifest["architecture"]["reference_rows"] > 5
    state = state_of(version_dir)
    rewrite(version_dir, weights=st_save({**state, "reference": state["reference"][:-1].clone()}))
    with pytest.raises(ShapeMismatch, match="reference"):
        read_checkpoint(version_dir)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda m: {**m, "neighbours": None}, id="knn-without-k"),
        pytest.param(
            lambda m: {**m, "neighbours": m["architecture"]["reference_rows"] + 1},
            id="k-above-reference-rows",
        ),
        pytest.param(lambda m: {**m, "score": "mae"}, id="k-without-knn"),
    ],
)
def test_inconsistent_knn_manifest(version_dir, corrupt):
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    (version_dir / MANIFEST_FILE).write_text(json.dumps(corrupt(manifest)))
    with pytest.raises(ManifestInvalid):
        read_checkpoint(version_dir)


def test_a_reconstruction_checkpoint_from_before_knn_scores_as_before(tmp_path, tiny_rows):
    fitted = fit(tiny_rows, TINY_FEATURES, TrainConfig(max_epochs=3, seed=0, score="mae"))
    version_dir = tmp_path / publish(tmp_path, fitted.model, fitted.manifest)
    # what an older trainer wrote: no neighbours, no architecture.reference_rows
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    del manifest["neighbours"], manifest["architecture"]["reference_rows"]
    (version_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert "reference" not in state_of(version_dir)
    scorer = load_scorer(version_dir)
    got = scorer.score_batch(tiny_rows)
    recon = scorer.reconstruct(tiny_rows)
    scale = np.asarray(manifest["scaler"]["scale"], dtype=np.float32)
    mae = (np.abs(tiny_rows - recon) / scale).mean(axis=1)
    np.testing.assert_allclose(got.scores, mae, rtol=1e-4, atol=1e-6)
    assert np.array_equal(got.scores, fitted.scorer().score_batch(tiny_rows).scores)


def test_safetensors_whose_header_length_starts_like_a_pickle_loads(version_dir):
    # A header of 128 + 256·j bytes makes the file's first byte 0x80, pickle's PROTO
    # opcode: still safetensors (nothing there is unpickled), and it must load.
    state = state_of(version_dir)
    weights = next(
        w
        for w in (st_save(state, metadata={"pad": "x" * pad}) for pad in range(256))
        if w[:1] == b"\x80"
    )
    assert weights[:1] == b"\x80"
    rewrite(version_dir, weights=weights)
    assert read_checkpoint(version_dir).state_dict.keys() == state.keys()
