"""Checkpoint format: safetensors weights + a JSON manifest, published atomically.

Layout of a model directory::

    models/
      20261127T153000Z-ab12cd/   model.safetensors + manifest.json
      LATEST                      one line: the live version's directory name

Nothing here ever unpickles: weights are read with safetensors, the manifest with
pydantic from JSON, and a file that looks like a pickle is refused outright.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from worker.calibration import TailFit, ThresholdMethod
from worker.model import CAEConfig, ContractiveAutoencoder
from worker.model_config import ScoreKind

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib"}


class CheckpointError(Exception):
    """A checkpoint that must not be served. The message says why, in one line."""


class CheckpointMissing(CheckpointError):
    pass


class IncompleteUpload(CheckpointError):
    """A version's commit record arrived on the model topic but its chunks are missing
    (an interrupted, torn upload)."""


class ManifestInvalid(CheckpointError):
    pass


class IntegrityError(CheckpointError):
    """Truncated or tampered weights: the sha256 or the safetensors header is wrong."""


class UnsafePayload(CheckpointError):
    """A pickle (or pickle-bearing file) where only safetensors is allowed."""


class ShapeMismatch(CheckpointError):
    pass


class NonFiniteWeights(CheckpointError):
    pass


class GoldenMismatch(CheckpointError):
    """The golden batch does not reproduce its recorded scores."""


class Scaler(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["standard", "robust"] = "standard"
    center: list[float]
    scale: list[float]


class Golden(BaseModel):
    """A few raw (unscaled) input rows with the scores the trainer computed for them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: list[list[float]]
    scores: list[float]


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    version: str = ""
    created_at: str = ""
    feature_names: list[str]
    input_dim: int = Field(gt=0)
    architecture: CAEConfig
    scaler: Scaler
    # How a row's score is computed (worker.scoring): "mse" / "mae" from the per-feature
    # reconstruction errors, "knn" the mean distance to the `neighbours` nearest of the
    # architecture's `reference_rows` stored rows.
    score: ScoreKind = "mse"
    neighbours: int | None = Field(default=None, gt=0)
    threshold: float
    target_fpr: float = Field(gt=0, lt=1)
    # Sorted scores of the calibration rows (normal rows scored as new ones would be:
    # every normal row for knn, the held-out ones for mae/mse): p-values up to the tail's t.
    calibration: list[float] = Field(min_length=1)
    # How the threshold was obtained, and the GPD tail of the calibration scores (p-values
    # beyond its t). Manifests written before tails existed have neither.
    threshold_method: ThresholdMethod = "empirical"
    tail: TailFit | None = None
    penalty_weight: float = Field(ge=0)
    # Per feature: do its training values (almost) never repeat? Then a key's rows that
    # hold one value for long are stuck (docs/contract.md#stuck-features). Manifests
    # written before the check have none, and no feature is checked.
    continuous: list[bool] | None = None
    metrics: dict[str, float | int | str | None] = Field(default_factory=dict)
    weights_sha256: str = ""
    golden: Golden

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        d = self.input_dim
        if self.architecture.input_dim != d:
            raise ValueError(
                f"architecture.input_dim {self.architecture.input_dim} != input_dim {d}"
            )
        if len(self.feature_names) != d or len(set(self.feature_names)) != d:
            raise ValueError(f"feature_names must be {d} distinct names")
        if len(self.scaler.center) != d or len(self.scaler.scale) != d:
            raise ValueError(f"scaler must have {d} centers and scales")
        if self.continuous is not None and len(self.continuous) != d:
            raise ValueError(f"continuous must have {d} flags")
        if any(not math.isfinite(s) or s <= 0 for s in self.scaler.scale):
            raise ValueError("scaler scales must be finite and positive")
        if not math.isfinite(self.threshold):
            raise ValueError("threshold must be finite")
        if any(len(row) != d for row in self.golden.inputs):
            raise ValueError(f"golden inputs must have {d} columns")
        if len(self.golden.inputs) != len(self.golden.scores) or not self.golden.inputs:
            raise ValueError("golden batch must have as many scores as inputs, at least one")
        if (self.score == "knn") != (self.neighbours is not None):
            raise ValueError("score 'knn' needs neighbours (k), and only it")
        if self.neighbours is not None and self.architecture.reference_rows < self.neighbours:
            raise ValueError(
                f"knn score: {self.architecture.reference_rows} reference rows, "
                f"fewer than neighbours {self.neighbours}"
            )
        if any(b < a for a, b in zip(self.calibration, self.calibration[1:], strict=False)):
            raise ValueError("calibration must be sorted")
        if self.threshold_method == "gpd":
            if self.tail is None:
                raise ValueError("threshold_method 'gpd' needs a tail")
            if self.threshold < self.tail.t or self.target_fpr >= self.tail.tail_rate:
                raise ValueError(
                    "a gpd threshold lies beyond the tail's t, its rate below n_peaks/n"
                )
        return self


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def make_version(weights_sha256: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{weights_sha256[:6]}"


def publish(
    model_dir: str | os.PathLike,
    model: ContractiveAutoencoder,
    manifest: Manifest,
    keep: int = 5,
    verify: Callable[[Path], object] | None = None,
) -> str:
    """Write a complete version directory, then point LATEST at it; prune to `keep`.

    Returns the version name. A reader never sees a half-written version: the
    directory appears by rename once its files are fsynced, and LATEST is replaced
    by rename after that. `verify(version_dir)` runs before LATEST moves; if it
    raises, the version directory is removed, LATEST is untouched and the error
    propagates.
    """
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    weights = st_save(state)
    digest = sha256_bytes(weights)
    now = datetime.now(UTC)
    version = make_version(digest, now)
    while (root / version).exists():  # two publications in the same millisecond
        now = datetime.now(UTC)
        version = make_version(digest, now)
    final = manifest.model_copy(
        update={
            "version": version,
            "created_at": now.isoformat().replace("+00:00", "Z"),
            "weights_sha256": digest,
        }
    )
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        _write_synced(tmp / WEIGHTS_FILE, weights)
        _write_synced(tmp / MANIFEST_FILE, final.model_dump_json(indent=2).encode())
        _fsync_dir(tmp)
        os.rename(tmp, root / version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    if verify is not None:
        try:
            verify(root / version)
        except BaseException:
            shutil.rmtree(root / version, ignore_errors=True)
            raise
    latest_tmp = root / f".{LATEST_FILE}.{os.getpid()}.tmp"
    _write_synced(latest_tmp, (version + "\n").encode())
    os.replace(latest_tmp, root / LATEST_FILE)
    _fsync_dir(root)
    prune(root, keep)
    return version


def list_versions(model_dir: str | os.PathLike) -> list[str]:
    root = Path(model_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def prune(model_dir: str | os.PathLike, keep: int) -> list[str]:
    """Remove all but the newest `keep` versions; never the one LATEST names."""
    root = Path(model_dir)
    live = read_latest(root)
    versions = list_versions(root)
    doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != live]
    for v in doomed:
        shutil.rmtree(root / v, ignore_errors=True)
    return doomed


def read_latest(model_dir: str | os.PathLike) -> str | None:
    """The version LATEST names, or None when there is no LATEST yet."""
    try:
        name = (Path(model_dir) / LATEST_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name or name.startswith("."):
        raise CheckpointMissing(f"LATEST in {model_dir} names no valid version: {name!r}")
    return name


def _looks_like_pickle(data: bytes) -> bool:
    # Pickle protocol 2+ starts with PROTO (0x80); torch.save zips start with PK.
    # Protocols 0 and 1 start with any opcode but, like every pickle, end in STOP (".").
    # A file with a safetensors header is read as safetensors (which never unpickles)
    # whatever its first bytes: its 8-byte header length may well start with 0x80 or
    # "PK" (a header of 128 + 256·j bytes does), and such a file is no pickle.
    if _has_safetensors_header(data):
        return False
    return data[:1] == b"\x80" or data[:2] == b"PK" or data[-1:] == b"."


def _has_safetensors_header(data: bytes) -> bool:
    """8-byte little-endian header length, then a JSON object that fits in the file."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def _header_shapes(name: str, weights: bytes) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's (dtype, shape) as the safetensors header declares it, read without
    loading any tensor."""
    n = int.from_bytes(weights[:8], "little") if len(weights) >= 8 else 0
    try:
        if not _has_safetensors_header(weights):
            raise ValueError("no header")
        header = json.loads(weights[8 : 8 + n])
        return {
            k: (str(v["dtype"]), tuple(int(d) for d in v["shape"]))
            for k, v in header.items()
            if k != "__metadata__"
        }
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise IntegrityError(f"{name}: {WEIGHTS_FILE} is not valid safetensors: {e}") from None


def _check_shapes(
    name: str, architecture: CAEConfig, got: dict[str, tuple[str, tuple[int, ...]]]
) -> None:
    """Every tensor the architecture needs, in the shape it needs, float32.

    The expected shapes come from the model built on the meta device (no memory), so
    a manifest that declares a huge architecture is refused before anything the size
    of that architecture is allocated.
    """
    with torch.device("meta"):
        expected = {
            k: tuple(v.shape) for k, v in ContractiveAutoencoder(architecture).state_dict().items()
        }
    shapes = {k: shape for k, (_, shape) in got.items()}
    if expected != shapes:
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
        detail = "; ".join(
            s
            for s in (
                f"missing {missing}" if missing else "",
                f"unexpected {extra}" if extra else "",
                ", ".join(f"{k} is {shapes[k]}, expected {expected[k]}" for k in wrong),
            )
            if s
        )
        raise ShapeMismatch(f"{name}: weights do not fit the architecture: {detail}")
    for k, (dtype, _) in got.items():
        if dtype != "F32":
            raise ShapeMismatch(f"{name}: {k} is {dtype}, expected float32 (F32)")


class Checkpoint(BaseModel):
    """A verified checkpoint on the host: manifest plus float32 weights."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    manifest: Manifest
    state_dict: dict[str, torch.Tensor]

    def build_model(self, device: torch.device | str = "cpu") -> ContractiveAutoencoder:
        model = ContractiveAutoencoder(self.manifest.architecture)
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device).eval()


def read_checkpoint(version_dir: str | os.PathLike) -> Checkpoint:
    """Read and verify one version directory. Raises a CheckpointError subclass.

    Checks: no pickle-bearing files; manifest parses and is self-consistent;
    weights' sha256 matches; safetensors header is intact and names every tensor
    the architecture needs, in its shape, float32 (checked before any tensor is
    loaded or any model built); every weight is finite. (The golden batch is
    checked by the scorer on its own device: worker.scoring.load_scorer.)
    """
    path = Path(version_dir)
    if not path.is_dir():
        raise CheckpointMissing(f"checkpoint {path} does not exist")
    for f in path.iterdir():
        if f.suffix.lower() in _PICKLE_SUFFIXES:
            raise UnsafePayload(
                f"{f.name}: pickle-format files are never loaded; only {WEIGHTS_FILE}"
            )
    try:
        raw_manifest = (path / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        raise ManifestInvalid(f"{path.name}: {MANIFEST_FILE} is missing") from None
    try:
        manifest = Manifest.model_validate_json(raw_manifest)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise ManifestInvalid(
            f"{path.name}: {MANIFEST_FILE} is malformed at {where}: {first['msg']}"
        ) from None
    try:
        weights = (path / WEIGHTS_FILE).read_bytes()
    except FileNotFoundError:
        raise CheckpointMissing(f"{path.name}: {WEIGHTS_FILE} is missing") from None
    if _looks_like_pickle(weights):
        raise UnsafePayload(
            f"{path.name}: {WEIGHTS_FILE} holds a pickle payload; refusing to load it"
        )
    digest = sha256_bytes(weights)
    if digest != manifest.weights_sha256:
        raise IntegrityError(
            f"{path.name}: sha256 of {WEIGHTS_FILE} is {digest[:12]}…, manifest says "
            f"{manifest.weights_sha256[:12]}… (truncated or tampered)"
        )
    _check_shapes(path.name, manifest.architecture, _header_shapes(path.name, weights))
    try:
        state = st_load(weights)
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path.name}: {WEIGHTS_FILE} is not valid safetensors: {e}") from None
    for k, v in state.items():
        if not torch.isfinite(v).all():
            raise NonFiniteWeights(f"{path.name}: {k} has non-finite values")
    return Checkpoint(path=path, manifest=manifest, state_dict=state)


def read_latest_checkpoint(model_dir: str | os.PathLike) -> Checkpoint:
    version = read_latest(model_dir)
    if version is None:
        raise CheckpointMissing(f"no {LATEST_FILE} in {model_dir}: no model has been published yet")
    return read_checkpoint(Path(model_dir) / version)
