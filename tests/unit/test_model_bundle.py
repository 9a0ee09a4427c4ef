"""Checkpoints as model-topic records: the container, chunking and assembly
(worker/model_bundle.py), and the topic source's rules with the watcher (worker/model_topic.py
with its reader replaced by a list of records; the broker is the integration tier's)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from tests.support import PickleCanary, pickle_payload
from worker.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    IncompleteUpload,
    IntegrityError,
    UnsafePayload,
    publish,
)
from worker.metrics import WorkerMetrics
from worker.model_bundle import (
    MalformedRecord,
    Record,
    TopicState,
    pack,
    records_for,
    unpack,
)
from worker.model_topic import ModelTopicSource
from worker.reload import CheckpointWatcher
from worker.settings import KafkaSettings


def version_dir(tmp_path: Path, files: dict[str, bytes]) -> Path:
    d = tmp_path / "20261130T070000000Z-abcdef"
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return d


def test_every_file_of_the_directory_travels_and_comes_back_byte_for_byte(tmp_path):
    files = {
        "model.safetensors": os.urandom(3000),
        "manifest.json": b'{"version": "x"}',
        "extra_tensors.safetensors": os.urandom(500),  # a file the transport does not know
        "sub/notes.json": b"{}",
    }
    payload = pack(version_dir(tmp_path, files))
    out = tmp_path / "out"
    out.mkdir()
    assert sorted(unpack(payload, out)) == sorted(files)
    assert {n: (out / n).read_bytes() for n in files} == files


def test_the_container_is_deterministic(tmp_path):
    d = version_dir(tmp_path, {"a": b"1", "b": b"2"})
    first = pack(d)
    os.utime(d / "a", (0, 12345))
    assert pack(d) == first


def test_a_link_in_the_directory_is_not_published(tmp_path):
    d = version_dir(tmp_path, {"model.safetensors": b"w"})
    (d / "manifest.json").symlink_to("/etc/passwd")
    with pytest.raises(UnsafePayload, match="only regular files"):
        pack(d)


def _tar(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(data) if m.isreg() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname, m.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    return m


@pytest.mark.parametrize(
    "members, match",
    [
        ([_member("model.safetensors", tarfile.SYMTYPE, "/etc/passwd")], "not a regular file"),
        ([_member("model.safetensors", tarfile.LNKTYPE, "manifest.json")], "not a regular file"),
        ([_member("../escape")], "not a plain relative path"),
        ([_member("/abs")], "not a plain relative path"),
        ([_member(".hidden")], "not a plain relative path"),
        ([_member("a"), _member("a")], "appears twice"),
    ],
)
def test_a_hostile_container_is_refused_before_any_file_lands_outside(tmp_path, members, match):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafePayload, match=match):
        unpack(_tar(*members), out)
    assert not (tmp_path / "escape").exists()


def test_bytes_that_are_not_a_tar_are_an_integrity_error(tmp_path):
    with pytest.raises(IntegrityError):
        unpack(b"\x00garbage" * 100, tmp_path)


def apply_all(state: TopicState, records: list[Record]) -> None:
    for r in records:
        state.apply(r.key, r.value, r.headers)


PAYLOAD = os.urandom(10_000)


@pytest.mark.parametrize("chunk_bytes", [1024, 3333, 10_000, 50_000])
def test_chunks_in_any_order_assemble_to_the_whole(chunk_bytes):
    records = records_for("v1", "t", PAYLOAD, chunk_bytes)
    *chunks, commit = records
    assert len(chunks) == -(-len(PAYLOAD) // chunk_bytes)
    assert all(len(r.value) <= chunk_bytes for r in chunks)
    headers = dict(commit.headers)
    assert headers["cae.sha256"] == hashlib.sha256(PAYLOAD).hexdigest().encode()
    random.Random(0).shuffle(chunks)
    state = TopicState()
    apply_all(state, [*chunks, commit])
    assert state.newest_complete() == "v1"
    data, meta = state.payload("v1")
    assert data == PAYLOAD and meta["chunks"] == len(chunks) and meta["bytes"] == len(PAYLOAD)


def test_a_version_is_not_complete_before_its_commit_record():
    *chunks, commit = records_for("v1", "t", PAYLOAD, 1024)
    state = TopicState()
    apply_all(state, chunks)
    assert state.newest_complete() is None
    apply_all(state, [commit])
    assert state.newest_complete() == "v1"


def test_a_commit_with_chunks_missing_is_a_torn_upload():
    *chunks, commit = records_for("v1", "t", PAYLOAD, 1024)
    state = TopicState()
    apply_all(state, chunks[:4] + chunks[5:] + [commit])
    with pytest.raises(IncompleteUpload, match="1 of 10 chunks missing \\(4\\)"):
        state.payload("v1")


def test_a_tampered_chunk_is_an_integrity_error():
    *chunks, commit = records_for("v1", "t", PAYLOAD, 1024)
    bad = Record(chunks[3].key, b"\x00" + chunks[3].value[1:], chunks[3].headers)
    state = TopicState()
    apply_all(state, chunks[:3] + [bad] + chunks[4:] + [commit])
    with pytest.raises(IntegrityError, match="tampered or torn"):
        state.payload("v1")


def test_a_chunk_of_another_upload_of_the_same_version_is_refused():
    *chunks, commit = records_for("v1", "t", PAYLOAD, 1024)
    *other, _ = records_for("v1", "t", os.urandom(10_000), 1024)
    state = TopicState()
    apply_all(state, chunks[:9] + other[9:] + [commit])
    with pytest.raises(IntegrityError, match="do not belong"):
        state.payload("v1")


def test_the_newest_complete_version_wins_and_older_ones_are_never_offered_again():
    state = TopicState()
    for v in ("20261130T070000000Z-aaaaaa", "20261130T080000000Z-bbbbbb"):
        apply_all(state, records_for(v, "t", PAYLOAD, 4096))
    *torn, _ = records_for("20261130T090000000Z-cccccc", "t", PAYLOAD, 4096)
    apply_all(state, torn)  # newest, but never committed
    assert state.newest_complete() == "20261130T080000000Z-bbbbbb"
    state.forget_through("20261130T080000000Z-bbbbbb")
    assert state.newest_complete() is None
    apply_all(state, records_for("20261130T070000000Z-aaaaaa", "t", PAYLOAD, 4096))  # a replay
    assert state.newest_complete() is None


def test_tombstones_remove_a_version():
    records = records_for("v1", "t", PAYLOAD, 4096)
    state = TopicState()
    apply_all(state, records)
    apply_all(state, [Record(r.key, None, []) for r in records])
    assert state.newest_complete() is None and state.versions() == {}


@pytest.mark.parametrize(
    "key, headers",
    [
        (b"no-slash", []),
        (b"v1/chunk/00000", []),
        (
            b"v1/chunk/00000",
            [
                ("cae.kind", b"chunk"),
                ("cae.version", b"v2"),
                ("cae.count", b"1"),
                ("cae.sha256", b"x"),
                ("cae.index", b"0"),
            ],
        ),
        (
            b"v1/chunk/00000",
            [
                ("cae.kind", b"pickle"),
                ("cae.version", b"v1"),
                ("cae.count", b"1"),
                ("cae.sha256", b"x"),
            ],
        ),
        (b"\xff/commit", []),
    ],
)
def test_a_malformed_record_is_reported_and_changes_nothing(key, headers):
    state = TopicState()
    with pytest.raises(MalformedRecord):
        state.apply(key, b"data", headers)
    assert state.versions() == {}


# -- the topic source with the watcher, records fed by hand ---------------------------


class ListReader:
    """Stands in for TopicReader: each catch_up applies the records given since."""

    def __init__(self):
        self.pending: list[Record] = []

    def catch_up(self, state, budget_s):
        while self.pending:
            r = self.pending.pop(0)
            state.apply(r.key, r.value, r.headers)
        return True

    def close(self):
        pass


def topic_source(tmp_path) -> tuple[ModelTopicSource, ListReader]:
    source = ModelTopicSource(KafkaSettings(), "models", tmp_path / "cache")
    source.reader = ListReader()
    return source, source.reader


def records_of(model_dir: Path, version: str, chunk_bytes: int = 2048) -> list[Record]:
    return records_for(version, "2026-11-30T07:00:00Z", pack(model_dir / version), chunk_bytes)


def watcher_on(source) -> CheckpointWatcher:
    return CheckpointWatcher(source, "cpu", "fp32", poll_s=0.02, metrics=WorkerMetrics())


def refusals(w: CheckpointWatcher, reason: str) -> float | None:
    return w.metrics.registry.get_sample_value(
        "cae_model_reloads_total", {"result": "refused", "reason": reason}
    )


@pytest.fixture
def versions(tmp_path, tiny_model) -> tuple[Path, list[str]]:
    root = tmp_path / "published"
    return root, [publish(root, tiny_model.model, tiny_model.manifest) for _ in range(3)]


def test_a_started_worker_takes_the_newest_and_never_an_older_one(tmp_path, versions):
    root, (v1, v2, v3) = versions
    source, reader = topic_source(tmp_path)
    w = watcher_on(source)
    reader.pending += records_of(root, v1) + records_of(root, v3) + records_of(root, v2)
    assert w.check_once().version == v3
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [v3]
    reader.pending += records_of(root, v2) + records_of(root, v1)  # a replay
    assert w.check_once() is None


def test_a_torn_upload_is_never_served_and_a_committed_torn_one_is_refused(tmp_path, versions):
    root, (v1, v2, v3) = versions
    source, reader = topic_source(tmp_path)
    w = watcher_on(source)
    reader.pending += records_of(root, v1)
    assert w.check_once().version == v1
    *chunks, commit = records_of(root, v2, chunk_bytes=1024)
    reader.pending += chunks[: len(chunks) // 2]  # the trainer died half-way
    assert w.check_once() is None and w.check_once() is None
    reader.pending += chunks[len(chunks) // 2 + 1 :] + [commit]  # a chunk lost, then a commit
    assert w.check_once() is None
    assert refusals(w, "IncompleteUpload") == 1 and w.refused == {v2: "IncompleteUpload"}
    reader.pending += records_of(root, v3)
    assert w.check_once().version == v3


def test_a_tampered_checkpoint_inside_a_whole_that_checks_out_is_refused(tmp_path, versions):
    root, (v1, v2, _) = versions
    source, reader = topic_source(tmp_path)
    w = watcher_on(source)
    reader.pending += records_of(root, v1)
    assert w.check_once().version == v1
    weights = root / v2 / WEIGHTS_FILE
    weights.write_bytes(
        weights.read_bytes()[:-4] + b"\x00\x00\x80\x7f"
    )  # re-packed: outer sha fits
    reader.pending += records_of(root, v2)
    assert w.check_once() is None
    assert refusals(w, "IntegrityError") == 1


def test_an_older_checkpoint_renamed_newer_is_refused(tmp_path, versions):
    root, (v1, v2, _) = versions
    source, reader = topic_source(tmp_path)
    w = watcher_on(source)
    reader.pending += records_of(root, v2)
    assert w.check_once().version == v2
    fake = "20991231T000000000Z-" + v1[-6:]
    (root / v1).rename(root / fake)
    reader.pending += records_of(root, fake)
    assert w.check_once() is None
    assert refusals(w, "ManifestInvalid") == 1


def test_a_pickle_in_the_upload_is_refused_and_never_unpickled(tmp_path, versions):
    root, (v1, v2, _) = versions
    canary = tmp_path / "canary"
    (root / v2 / "extra.pkl").write_bytes(pickle_payload(canary))
    source, reader = topic_source(tmp_path)
    w = watcher_on(source)
    reader.pending += records_of(root, v1) + records_of(root, v2)
    assert w.check_once() is None  # v2, the newest, refused
    assert refusals(w, "UnsafePayload") == 1 and not canary.exists()
    assert PickleCanary  # the payload's class: unpickling it would touch `canary`
    assert w.check_once().version == v1  # nothing served yet: the newest valid one


def test_refused_and_superseded_versions_leave_nothing_in_the_cache(tmp_path, versions):
    root, (v1, v2, v3) = versions
    source, reader = topic_source(tmp_path)
    w = watcher_on(source)
    reader.pending += records_of(root, v1)
    w.check_once()
    (root / v2 / MANIFEST_FILE).write_text("{")
    reader.pending += records_of(root, v2)
    assert w.check_once() is None
    reader.pending += records_of(root, v3)
    assert w.check_once().version == v3
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [v3]


def test_the_model_topic_clients_use_the_kafka_security_settings(tmp_path, monkeypatch):
    """SASL and TLS reach the worker's model consumer and the trainer's producer, the
    same keyword arguments as the worker's other clients."""
    from worker import model_topic

    kafka = KafkaSettings(
        bootstrap_servers="broker:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="cae",
        sasl_password="s3cr3t",
        ssl_cafile=tmp_path / "ca.pem",
    )
    seen: dict[str, dict] = {}

    class Refused(Exception):
        pass

    def capture(kind):
        def make(**kw):
            seen[kind] = kw
            raise Refused

        return make

    monkeypatch.setattr(model_topic, "KafkaConsumer", capture("consumer"))
    monkeypatch.setattr(model_topic, "KafkaProducer", capture("producer"))
    with pytest.raises(Refused):
        model_topic.TopicReader(kafka, "models").catch_up(TopicState(), 1)
    d = version_dir(tmp_path, {"manifest.json": b"{}", "model.safetensors": b"w"})
    with pytest.raises(Refused):
        model_topic.publish_version(kafka, "models", d, 1024)
    for kw in seen.values():
        assert kw.items() >= kafka.client_kwargs().items()
        assert kw["sasl_plain_password"] == "s3cr3t" and kw["ssl_cafile"].endswith("ca.pem")
    assert seen["consumer"]["group_id"] is None and seen["consumer"]["enable_auto_commit"] is False


def test_a_refused_version_read_again_after_a_reconnection_is_not_tried_again(tmp_path, versions):
    root, (v1, v2, _) = versions
    source, reader = topic_source(tmp_path)
    w = watcher_on(source)
    *chunks, commit = records_of(root, v2, chunk_bytes=1024)
    reader.pending += records_of(root, v1) + chunks[1:] + [commit]
    assert w.check_once() is None  # the newest, v2, is torn: refused
    assert w.check_once().version == v1  # nothing served yet: the newest valid one
    reader.pending += records_of(root, v1) + chunks[1:] + [commit]  # the topic read once more
    assert w.check_once() is None and w.check_once() is None
    assert refusals(w, "IncompleteUpload") == 1
