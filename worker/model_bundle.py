"""A checkpoint as Kafka records: the version directory packed into one tar, cut into
chunks, and a commit record that makes the version complete (docs/contract.md#model-topic).

Pure logic, no I/O beyond the version directory: `pack`/`unpack` (the container),
`records_for` (what the trainer sends), `TopicState` (what a reader assembles from the
records it has seen). Nothing is ever unpickled: the container is a plain tar of
regular files, read member by member; links, devices and paths that leave the
directory are refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from worker.checkpoint import CheckpointError, IncompleteUpload, IntegrityError, UnsafePayload

BUNDLE_FORMAT = 1
CONTAINER = "tar"
MAX_CHUNKS = 100_000
H_KIND, H_VERSION, H_INDEX, H_COUNT, H_SHA256 = (
    "cae.kind",
    "cae.version",
    "cae.index",
    "cae.count",
    "cae.sha256",
)
KIND_CHUNK, KIND_COMMIT = b"chunk", b"commit"


def _member_name(rel: str) -> str:
    """A path inside the container: relative, no '..', no empty or dot-leading parts."""
    parts = PurePosixPath(rel).parts
    if (
        not parts
        or PurePosixPath(rel).is_absolute()
        or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
    ):
        raise UnsafePayload(f"container member {rel!r} is not a plain relative path")
    return "/".join(parts)


def pack(version_dir: str | os.PathLike) -> bytes:
    """Every regular file under `version_dir` (any name, any depth) in one
    deterministic tar: sorted names, mtime 0, owner 0, mode 0644. A link or a
    special file in the directory is an error: only file contents travel."""
    root = Path(version_dir)
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                raise UnsafePayload(f"{path}: only regular files can be published")
            files.append((_member_name(path.relative_to(root).as_posix()), path))
    if not files:
        raise CheckpointError(f"{root}: no files to publish")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in sorted(files):
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack(payload: bytes, into: str | os.PathLike) -> list[str]:
    """Write the container's files under `into` (an empty directory); returns their
    names. Raises IntegrityError for a container that is not a tar, UnsafePayload for
    a link, a special file, a duplicate or a path that leaves the directory."""
    root = Path(into)
    names: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tar:
            for member in tar:
                name = _member_name(member.name)
                if not member.isreg():
                    raise UnsafePayload(f"container member {name!r} is not a regular file")
                if name in names:
                    raise UnsafePayload(f"container member {name!r} appears twice")
                src = tar.extractfile(member)
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(src.read() if src is not None else b"")
                names.append(name)
    except tarfile.TarError as e:
        raise IntegrityError(f"the checkpoint container is not a valid tar: {e}") from None
    if not names:
        raise IntegrityError("the checkpoint container holds no files")
    return names


@dataclass(frozen=True)
class Record:
    """One record for the model topic (key, value, headers as kafka-python takes them)."""

    key: bytes
    value: bytes | None
    headers: list[tuple[str, bytes]]


def chunk_key(version: str, index: int) -> bytes:
    return f"{version}/chunk/{index:05d}".encode()


def commit_key(version: str) -> bytes:
    return f"{version}/commit".encode()


def records_for(version: str, created_at: str, payload: bytes, chunk_bytes: int) -> list[Record]:
    """The chunk records, in order, then the commit record (send it only once every
    chunk is acknowledged)."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    digest = hashlib.sha256(payload).hexdigest()
    pieces = [payload[i : i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)] or [b""]
    count = len(pieces)
    common = [
        (H_VERSION, version.encode()),
        (H_COUNT, str(count).encode()),
        (H_SHA256, digest.encode()),
    ]
    out = [
        Record(
            chunk_key(version, i),
            piece,
            [(H_KIND, KIND_CHUNK), *common, (H_INDEX, str(i).encode())],
        )
        for i, piece in enumerate(pieces)
    ]
    commit = {
        "format": BUNDLE_FORMAT,
        "version": version,
        "created_at": created_at,
        "container": CONTAINER,
        "sha256": digest,
        "bytes": len(payload),
        "chunks": count,
    }
    out.append(
        Record(commit_key(version), json.dumps(commit).encode(), [(H_KIND, KIND_COMMIT), *common])
    )
    return out


@dataclass
class _Upload:
    chunks: dict[int, tuple[int, str, bytes]] = field(
        default_factory=dict
    )  # index → count, sha, data
    commit: dict | None = None
    keys: set[bytes] = field(default_factory=set)


class MalformedRecord(ValueError):
    """A record on the model topic that names no version or chunk it could belong to."""


def _parse_key(key: bytes | None) -> tuple[str, str]:
    try:
        text = (key or b"").decode()
    except UnicodeDecodeError:
        raise MalformedRecord(f"key {key!r} is not UTF-8") from None
    version, _, rest = text.partition("/")
    if not version or version.startswith(".") or not rest:
        raise MalformedRecord(f"key {text!r} is not VERSION/chunk/N or VERSION/commit")
    return version, rest


class TopicState:
    """What the records seen so far say: per version, its chunks and its commit.

    Records are applied in offset order (one partition). The latest value of a key
    wins and a tombstone (no value) removes it, as compaction would. A version is
    *complete* once its commit record is there; `payload` then joins its chunks and
    checks them against the commit. Versions at or below `floor` (the newest one
    served) are forgotten: nothing ever goes back to them.
    """

    def __init__(self) -> None:
        self._uploads: dict[str, _Upload] = {}
        self.floor: str | None = None

    def apply(self, key: bytes | None, value: bytes | None, headers) -> None:
        """Apply one record. Raises MalformedRecord for one that names no chunk or
        commit (the caller logs it and goes on)."""
        version, rest = _parse_key(key)
        if self.floor is not None and version <= self.floor:
            return
        upload = self._uploads.setdefault(version, _Upload())
        if value is None:  # tombstone: compaction will drop the key
            upload.keys.discard(key)
            if rest == "commit":
                upload.commit = None
            elif rest.startswith("chunk/") and rest[6:].isdigit():
                upload.chunks.pop(int(rest[6:]), None)
            if not upload.keys:
                del self._uploads[version]
            return
        h = {k: v for k, v in (headers or [])}
        try:
            count = int(h[H_COUNT])
            sha = h[H_SHA256].decode()
            if h[H_VERSION].decode() != version:
                raise MalformedRecord(f"key {key!r} and header version {h[H_VERSION]!r} differ")
            kind = h[H_KIND]
            if kind == KIND_CHUNK:
                index = int(h[H_INDEX])
                if rest != f"chunk/{index:05d}":
                    raise MalformedRecord(f"key {key!r} does not match chunk index {index}")
                upload.chunks[index] = (count, sha, value)
            elif kind == KIND_COMMIT and rest == "commit":
                upload.commit = json.loads(value)
                if not isinstance(upload.commit, dict):
                    raise MalformedRecord(f"commit record of {version} is not a JSON object")
            else:
                raise MalformedRecord(f"key {key!r}: unknown record kind {kind!r}")
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            if not upload.keys:
                self._uploads.pop(version, None)
            if isinstance(e, MalformedRecord):
                raise
            raise MalformedRecord(f"key {key!r}: {type(e).__name__}: {e}") from None
        upload.keys.add(key)

    def newest_complete(self, exclude: set[str] = frozenset()) -> str | None:
        done = [v for v, u in self._uploads.items() if u.commit is not None and v not in exclude]
        return max(done) if done else None

    def versions(self) -> dict[str, set[bytes]]:
        """Every version with a live key, and its keys (for pruning)."""
        return {v: set(u.keys) for v, u in self._uploads.items()}

    def complete(self) -> list[str]:
        return sorted(v for v, u in self._uploads.items() if u.commit is not None)

    def payload(self, version: str) -> tuple[bytes, dict]:
        """The container of a complete version, checked against its commit record:
        every chunk present once, the same count and sha256 on each, the whole's size
        and sha256. Raises IncompleteUpload or IntegrityError."""
        upload = self._uploads.get(version)
        if upload is None or upload.commit is None:
            raise IncompleteUpload(f"{version}: no commit record")
        c = upload.commit
        try:
            count, sha, size = int(c["chunks"]), str(c["sha256"]), int(c["bytes"])
            if c.get("format") != BUNDLE_FORMAT or c.get("container") != CONTAINER:
                raise IntegrityError(
                    f"{version}: commit record has format {c.get('format')!r} / container "
                    f"{c.get('container')!r}, expected {BUNDLE_FORMAT} / {CONTAINER!r}"
                )
            if c.get("version") != version:
                raise IntegrityError(f"{version}: commit record names version {c.get('version')!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"{version}: commit record is malformed: {e}") from None
        if not 1 <= count <= MAX_CHUNKS:
            raise IntegrityError(f"{version}: commit record declares {count} chunks")
        missing = [i for i in range(count) if i not in upload.chunks]
        if missing:
            shown = ", ".join(str(i) for i in missing[:5]) + (" …" if len(missing) > 5 else "")
            raise IncompleteUpload(
                f"{version}: {len(missing)} of {count} chunks missing ({shown}): torn upload"
            )
        extra = sorted(set(upload.chunks) - set(range(count)))
        bad = [i for i, (n, s, _) in upload.chunks.items() if n != count or s != sha]
        if extra or bad:
            raise IntegrityError(
                f"{version}: chunks {sorted(extra + bad)[:5]} do not belong to the committed upload"
            )
        data = b"".join(upload.chunks[i][2] for i in range(count))
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != size or digest != sha:
            raise IntegrityError(
                f"{version}: assembled {len(data)} bytes with sha256 {digest[:12]}…, commit "
                f"record says {size} bytes, {sha[:12]}… (tampered or torn)"
            )
        return data, c

    def forget_through(self, version: str) -> None:
        """`version` now serves: drop it and everything older, and never take them again."""
        self.floor = version if self.floor is None else max(self.floor, version)
        for v in [v for v in self._uploads if v <= self.floor]:
            del self._uploads[v]

    def forget(self, version: str) -> None:
        """Drop one version's data (refused); a later record of it starts afresh."""
        self._uploads.pop(version, None)
