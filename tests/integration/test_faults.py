"""Fault injection against the worker on the embedded broker.

Crashes (kill -9 at seeded random moments), network faults through a TCP proxy that the
broker advertises (connections reset, link stalled, broker unreachable at start-up), a
checkpoint reload storm with hostile checkpoints, hostile input, SIGTERM under load,
scale-out with a killed member, and a soak for resource leaks.

Every test has a short size (in `make test`) and a long one marked `soak` (`make soak`):
`sizes(short, long)` parametrizes the same body with both. Each test records a row
(records streamed, faults injected, lost, duplicates, recovery time); with
CAE_RELIABILITY_OUT=FILE.json the rows are written there (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer
from kafka.structs import TopicPartition
from safetensors.torch import save as st_save

from deploy.embedded_broker import EmbeddedBroker, free_port
from tests.integration.conftest import DIM, FEATURES
from tests.integration.kafka_helpers import (
    broker_hides_aborted,
    committed_offsets,
    create_topics,
    events_of,
    http_get,
    log_events,
    new_topics,
    producer,
    read_topic,
    start_worker,
    stop_worker,
    unique,
    wait_for,
    worker_env,
    worker_settings,
)
from tests.integration.tcp_proxy import TcpProxy
from tests.support import PickleCanary, normal_rows
from worker import codec
from worker.checkpoint import LATEST_FILE, MANIFEST_FILE, WEIGHTS_FILE, publish, sha256_bytes
from worker.clients import KeyPartitions
from worker.delivery import OutputTopics, _send, _send_state
from worker.model import CAEConfig, ContractiveAutoencoder
from worker.service import Worker
from worker.settings import WorkerSettings
from worker.step import BatchOutcome

SEED = int(os.environ.get("CAE_FAULT_SEED", "20261127"))


def sizes(short, long):
    """The same test body at two sizes: `short` in `make test`, `long` under -m soak."""
    return [
        pytest.param(short, id="short"),
        pytest.param(long, id="long", marks=[pytest.mark.soak, pytest.mark.timeout(1800)]),
    ]


# -- reliability rows -----------------------------------------------------------------------

_ROWS: list[dict] = []


@pytest.fixture(scope="session", autouse=True)
def _reliability_report():
    yield
    out = os.environ.get("CAE_RELIABILITY_OUT")
    if out and _ROWS:
        text = render_table(_ROWS) if out.endswith(".md") else json.dumps(_ROWS, indent=2) + "\n"
        Path(out).write_text(text)


def render_table(rows: list[dict]) -> str:
    """The rows as the markdown table of docs/reliability.md."""
    lines = [
        "| test | size | fault | records streamed | faults injected | lost | duplicates "
        "| recovery (s) | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        notes = "; ".join(
            f"{k.replace('_', ' ')} {r[k]}"
            for k in ("readyz_503_polls", "rss_mb", "fds", "threads", "aborted_visible", "wall_s")
            if k in r
        )
        lines.append(
            f"| {r['test'].removeprefix('test_')} | {r['params'] or '-'} | {r['fault']} "
            f"| {r['records']} | {r['faults']} | {r['lost']} | {r['duplicates']} "
            f"| {r['recovery_s']} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def record_row(request, **row) -> None:
    size = request.node.callspec.id if hasattr(request.node, "callspec") else ""
    _ROWS.append({"test": request.node.originalname, "params": size, **row})


# -- helpers --------------------------------------------------------------------------------


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = c.partitions_for_topic(topic) or set()
        ends = c.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        c.close()


def committed_total(bootstrap, topics) -> int:
    return sum(committed_offsets(bootstrap, topics["group"], topics["input"]).values())


def wait_all_committed(bootstrap, topics, timeout_s: float = 180) -> int:
    """Until the group's committed offsets reach the input's end offsets; returns the
    committed total. Checked twice, a second apart: a high-watermark read can lag."""

    def caught_up() -> int:
        ends = sum(end_offsets(bootstrap, topics["input"]).values())
        done = committed_total(bootstrap, topics)
        return done if done >= ends else 0

    wait_for(caught_up, timeout_s, 0.5, "all input records committed")
    time.sleep(1.0)
    return wait_for(caught_up, timeout_s, 0.5, "all input records committed")


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.exists() else "(no log)"


class Stream(threading.Thread):
    """Produces valid JSON records `{tag}{i}` at `rate` per second until stopped (or
    `limit`). `acked` holds the indices the broker acknowledged: the records that
    must each get a decision."""

    def __init__(
        self, bootstrap: str, topic: str, rate: float, tag: str = "x", limit=None, linger_ms=5
    ):
        super().__init__(daemon=True)
        self.linger_ms = linger_ms
        self.bootstrap, self.topic, self.rate, self.tag, self.limit = (
            bootstrap,
            topic,
            rate,
            tag,
            limit,
        )
        self.acked: set[int] = set()
        self.sent = 0
        self._stop_evt = threading.Event()
        self._lock = threading.Lock()

    def _ack(self, i):
        def cb(_md):
            with self._lock:
                self.acked.add(i)

        return cb

    def run(self) -> None:
        p = producer(
            self.bootstrap,
            retries=2**31 - 1,
            request_timeout_ms=15_000,
            linger_ms=self.linger_ms,
        )
        rows = normal_rows(2000, seed=5)
        start = time.monotonic()
        i = 0
        try:
            while not self._stop_evt.is_set() and (self.limit is None or i < self.limit):
                p.send(
                    self.topic,
                    key=f"k{i % 13}".encode(),
                    value=codec.encode_json(rows[i % len(rows)], id=f"{self.tag}{i}"),
                ).add_callback(self._ack(i))
                i += 1
                self.sent = i
                ahead = i / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    self._stop_evt.wait(ahead)
            p.flush(timeout=120)
        finally:
            p.close(timeout=30)

    def finish(self, timeout_s: float = 150) -> set[str]:
        """Stop (an unlimited stream; a limited one runs to its limit); the acked ids."""
        if self.limit is None:
            self._stop_evt.set()
        self.join(timeout_s)
        assert not self.is_alive(), "the producer did not finish"
        with self._lock:
            return {f"{self.tag}{i}" for i in self.acked}


def scored_ids(bootstrap, topic, expect, isolation="read_uncommitted") -> list[dict]:
    return events_of(
        read_topic(
            bootstrap, topic, expect=expect, timeout_s=120, quiet_s=3, isolation_level=isolation
        )
    )


def loss_and_duplicates(events: list[dict], expected_ids: set[str]) -> tuple[int, int]:
    seen = Counter(e["event_id"] for e in events)
    ids = {e["id"] for e in events}
    return len(expected_ids - ids), sum(c - 1 for c in seen.values())


def settings_for(bootstrap, topics, model_dir, **kw) -> WorkerSettings:
    return worker_settings(bootstrap, topics, model_dir, **{"emit": "all", **kw})


@pytest.fixture(scope="session")
def hides_aborted(broker) -> bool:
    """Whether the broker hides aborted transactional records from read_committed
    consumers. Apache Kafka does; Tansu 0.6 (the embedded broker) does not: an aborted
    transaction's records stay visible. There, a kill -9 in the middle of a transaction
    leaves that one batch visible twice (the aborted copy and the successor's re-score);
    the worker's part of exactly-once (outputs and offsets in one transaction, the
    fenced transaction's offsets discarded) is still checked: nothing is lost, and every
    duplicate belongs to one batch cut off by a kill."""
    return broker_hides_aborted(broker.bootstrap)


def assert_exactly_once(events, n_input, hides_aborted: bool, kills: int, batch: int) -> None:
    """read_committed events of an exactly-once run (see `hides_aborted`)."""
    per_id = Counter(e["event_id"] for e in events)
    assert len(per_id) == n_input, "every committed input record has exactly one event id"
    if hides_aborted:
        assert len(events) == n_input, "a read_committed consumer must see no duplicate"
        return
    dup_keys = sorted(
        (int(k.rsplit("-", 2)[1]), int(k.rsplit("-", 1)[1])) for k, c in per_id.items() if c > 1
    )
    assert max(per_id.values(), default=1) <= 2
    runs = 0
    for i, (part, off) in enumerate(dup_keys):
        if i == 0 or dup_keys[i - 1] != (part, off - 1):
            runs += 1
    # each run of duplicates is at most one micro-batch of one partition cut off by a kill
    assert len(dup_keys) <= kills * batch and runs <= kills * 6, (len(dup_keys), runs)


# -- 1. crashes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CrashSize:
    kills: int
    rate: float
    deliveries: tuple[str, ...]


@pytest.mark.parametrize(
    "size",
    sizes(
        CrashSize(kills=2, rate=400, deliveries=("exactly-once",)),
        CrashSize(kills=12, rate=400, deliveries=("at-least-once", "exactly-once")),
    ),
)
def test_repeated_kill_9_at_random_moments_loses_nothing(
    request, broker, model_dir, tmp_path, size, hides_aborted
):
    for delivery in size.deliveries:
        topics = new_topics(broker.bootstrap)
        rng = random.Random(f"{SEED}-crash-{delivery}")
        env = worker_env(
            broker.bootstrap,
            topics,
            model_dir,
            WORKER_EMIT="all",
            WORKER_DELIVERY=delivery,
            WORKER_MAX_BATCH_SIZE=200,
            WORKER_TRANSACTIONAL_ID=topics["group"] + "-w",
        )
        stream = Stream(broker.bootstrap, topics["input"], size.rate)
        stream.start()
        t_start = time.monotonic()
        committed_at_kill = []
        for k in range(size.kills):
            proc = start_worker(env, tmp_path / f"{delivery}-w{k}.log")
            before = committed_total(broker.bootstrap, topics)
            # the worker makes progress, then dies at a random moment without warning
            wait_for(
                lambda b=before, t=topics: committed_total(broker.bootstrap, t) > b,
                120,
                0.2,
                f"progress of worker {k}: {tail(tmp_path / f'{delivery}-w{k}.log', 800)}",
            )
            time.sleep(rng.uniform(0.0, 2.5))
            proc.kill()
            proc.wait()
            committed_at_kill.append(committed_total(broker.bootstrap, topics))
        proc = start_worker(env, tmp_path / f"{delivery}-final.log")
        time.sleep(rng.uniform(1.0, 3.0))
        expected = stream.finish()
        t_recover = time.monotonic()
        n_input = wait_all_committed(broker.bootstrap, topics, timeout_s=600)
        recovery_s = time.monotonic() - t_recover
        assert stop_worker(proc) == 0, tail(tmp_path / f"{delivery}-final.log")
        n_input = committed_total(broker.bootstrap, topics)
        assert committed_at_kill == sorted(committed_at_kill)
        assert committed_at_kill[-1] < n_input, "the last kill should land mid-stream"

        isolation = "read_committed" if delivery == "exactly-once" else "read_uncommitted"
        events = scored_ids(broker.bootstrap, topics["output"], n_input, isolation)
        lost, dups = loss_and_duplicates(events, expected)
        record_row(
            request,
            fault=f"kill -9 ×{size.kills} ({delivery})",
            records=len(expected),
            faults=size.kills,
            lost=lost,
            duplicates=dups,
            recovery_s=round(recovery_s, 1),
            wall_s=round(time.monotonic() - t_start, 1),
            **(
                {"aborted_visible": "yes (Tansu)"}
                if delivery == "exactly-once" and not hides_aborted
                else {}
            ),
        )
        assert lost == 0, f"{lost} records without a decision"
        if delivery == "exactly-once":
            assert_exactly_once(events, n_input, hides_aborted, size.kills, batch=200)


# -- 2, 3. network faults through a proxy the broker advertises ----------------------------


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """A dedicated broker whose advertised address is a TCP proxy in front of it."""
    proxy_port = free_port()
    log = tmp_path_factory.mktemp("proxied") / "tansu.log"
    with EmbeddedBroker(advertised_port=proxy_port, log_path=log) as b:
        proxy = TcpProxy(b.port, proxy_port).forward()
        try:
            yield b, proxy
        finally:
            proxy.close()


@dataclass(frozen=True)
class OutageSize:
    faults: tuple[tuple[str, float], ...]  # (mode, seconds)
    rate: float


def _outage(proxy: TcpProxy, port: int, mode: str, seconds: float) -> dict:
    """Hold the fault for `seconds`, polling /readyz; then heal and time the recovery."""
    statuses = []
    t0 = time.monotonic()
    proxy.set_mode(mode)
    while time.monotonic() - t0 < seconds:
        statuses.append(http_get(port, "/readyz"))
        time.sleep(0.5)
    proxy.forward()
    healed = time.monotonic()
    wait_for(lambda: http_get(port, "/readyz")[0] == 200, 120, 0.25, f"ready after {mode}")
    not_ready = [body for code, body in statuses if code == 503]
    return {
        "mode": mode,
        "seconds": seconds,
        "not_ready_polls": len(not_ready),
        "polls": len(statuses),
        "reasons": sorted(set(not_ready)),
        "ready_again_s": time.monotonic() - healed,
    }


def _start_with_metrics(broker, topics, model_dir, tmp_path):
    """A worker (events for every record) serving /metrics, /healthz, /readyz on a free port."""
    port = free_port()
    log = tmp_path / "w.log"
    env = worker_env(
        broker.bootstrap, topics, model_dir, WORKER_EMIT="all", WORKER_METRICS_PORT=port
    )
    return start_worker(env, log), port, log


@pytest.mark.parametrize(
    "size",
    sizes(
        OutageSize(faults=(("reset", 6.0), ("stall", 9.0)), rate=300),
        OutageSize(
            faults=(("reset", 10.0), ("stall", 20.0), ("reset", 30.0), ("stall", 30.0)), rate=800
        ),
    ),
)
def test_connections_dropped_or_stalled_worker_recovers_and_readyz_reports_it(
    request, proxied, model_dir, tmp_path, size
):
    broker, proxy = proxied
    proxy.forward()
    topics = new_topics(broker.bootstrap)
    proc, port, log = _start_with_metrics(broker, topics, model_dir, tmp_path)
    try:
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, 120, 0.5, "ready: " + tail(log))
        stream = Stream(broker.bootstrap, topics["input"], size.rate)
        stream.start()
        t_start = time.monotonic()
        outages = []
        for mode, seconds in size.faults:
            before = committed_total(broker.bootstrap, topics)
            wait_for(
                lambda b=before: committed_total(broker.bootstrap, topics) > b,
                120,
                0.25,
                "progress before the fault",
            )
            outages.append(_outage(proxy, port, mode, seconds))
        expected = stream.finish()
        t_drain = time.monotonic()
        n_input = wait_all_committed(broker.bootstrap, topics)
        drain_s = time.monotonic() - t_drain
        assert stop_worker(proc) == 0, tail(log)
    finally:
        proxy.forward()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = scored_ids(broker.bootstrap, topics["output"], n_input)
    lost, dups = loss_and_duplicates(events, expected)
    for o in outages:
        record_row(
            request,
            fault=f"proxy {o['mode']} {o['seconds']:.0f}s",
            records=len(expected),
            faults=1,
            lost=lost,
            duplicates=dups,
            recovery_s=round(o["ready_again_s"], 1),
            readyz_503_polls=f"{o['not_ready_polls']}/{o['polls']}",
            wall_s=round(time.monotonic() - t_start, 1),
        )
    assert lost == 0, f"{lost} records without a decision"
    for o in outages:
        assert o["not_ready_polls"] > 0, f"/readyz never reported the {o['mode']}: {o}"
    # kafka-python's own handled errors are folded into one line each (worker/logs.py);
    # an outage leaves no traceback at all
    assert "Traceback" not in log.read_text(), tail(log)
    assert drain_s < 120


def test_worker_started_before_the_broker_is_reachable_waits_with_backoff(
    request, proxied, model_dir, tmp_path
):
    broker, proxy = proxied
    proxy.forward()
    topics = new_topics(broker.bootstrap)
    proxy.down()  # connection refused, as if the broker had not started yet
    proc, port, log = _start_with_metrics(broker, topics, model_dir, tmp_path)
    try:

        def retries():
            return [e for e in log_events(log) if e.get("event") == "broker_unreachable"]

        wait_for(lambda: len(retries()) >= 2, 90, 0.5, "two broker_unreachable lines")
        delays = [e["retry_in_s"] for e in retries()]
        assert delays == sorted(delays) and delays[-1] > delays[0], f"no backoff: {delays}"
        assert all(e["level"] == "warning" for e in retries())
        code, body = http_get(port, "/readyz")
        assert code == 503 and "broker" in body, (code, body)
        assert http_get(port, "/healthz")[0] == 200, "waiting for the broker is alive"
        assert proc.poll() is None
        proxy.forward()
        t_up = time.monotonic()
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, 120, 0.25, "ready: " + tail(log))
        ready_s = time.monotonic() - t_up
        n = 500
        stream = Stream(broker.bootstrap, topics["input"], rate=1000, limit=n)
        stream.start()
        expected = stream.finish()
        n_input = wait_all_committed(broker.bootstrap, topics)
        assert stop_worker(proc) == 0, tail(log)
    finally:
        proxy.forward()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = scored_ids(broker.bootstrap, topics["output"], n_input)
    lost, dups = loss_and_duplicates(events, expected)
    record_row(
        request,
        fault="broker unreachable at start",
        records=n,
        faults=1,
        lost=lost,
        duplicates=dups,
        recovery_s=round(ready_s, 1),
    )
    assert lost == 0 and len(expected) == n


# -- 4. reload storm ----------------------------------------------------------------------

BAD_KINDS = {
    "truncated": "IntegrityError",
    "tampered": "IntegrityError",
    "wrong_dimension": "ShapeMismatch",
    "huge_architecture": "ShapeMismatch",
    "pickle_weights": "UnsafePayload",
    "pickle_file": "UnsafePayload",
}


_Canary = PickleCanary  # the hostile checkpoints below plant the shared pickle canary


def _publish_bad(kind: str, model_dir: Path, staging: Path, trained, canary: Path) -> str:
    """A hostile checkpoint in the model dir with LATEST pointing at it."""
    version = publish(staging, trained.model, trained.manifest)
    d = staging / version
    weights = d / WEIGHTS_FILE
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "tampered":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif kind == "wrong_dimension":
        arch = trained.manifest.architecture
        other = ContractiveAutoencoder(CAEConfig(**{**arch.model_dump(), "input_dim": DIM + 3}))
        data = st_save({k: v.contiguous() for k, v in other.state_dict().items()})
        weights.write_bytes(data)
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        manifest["weights_sha256"] = sha256_bytes(data)  # consistent, but the wrong shape
        (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif kind == "huge_architecture":  # intact weights; the manifest declares a vast code
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        manifest["architecture"]["code_dim"] = 10**11
        (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif kind == "pickle_weights":
        data = pickle.dumps(_Canary(canary), protocol=2)
        weights.write_bytes(data)
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        manifest["weights_sha256"] = sha256_bytes(data)
        (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif kind == "pickle_file":
        (d / "optimizer.pt").write_bytes(pickle.dumps(_Canary(canary)))
    d.rename(model_dir / version)
    tmp = model_dir / ".LATEST.storm.tmp"
    tmp.write_text(version + "\n")
    tmp.rename(model_dir / LATEST_FILE)
    return version


@pytest.mark.parametrize("publications", sizes(12, 50))
def test_reload_storm_with_hostile_checkpoints(
    request, broker, topics, model_dir, trained, tmp_path, publications
):
    _, v1, second = trained
    rng = random.Random(f"{SEED}-storm")
    kinds = ["good"] * (publications // 3)
    bad = list(BAD_KINDS)
    kinds += [bad[i % len(bad)] for i in range(publications - len(kinds))]
    rng.shuffle(kinds)
    canary = tmp_path / "unpickled"
    worker = Worker(settings_for(broker.bootstrap, topics, model_dir))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_for(lambda: worker.health.ready, 60, 0.2, "worker ready")
    stream = Stream(broker.bootstrap, topics["input"], rate=400)
    stream.start()
    good_versions, refused_versions = {v1}, {}
    t_start = time.monotonic()
    try:
        for i, kind in enumerate(kinds):
            time.sleep(rng.uniform(0.0, 0.4))
            if kind == "good":
                v = publish(model_dir, second.model, second.manifest)
                good_versions.add(v)
                wait_for(lambda v=v: worker.scorer.version == v, 60, 0.05, f"swap to {v}")
            else:
                v = _publish_bad(kind, model_dir, tmp_path / f"staging{i}", second, canary)
                refused_versions[v] = BAD_KINDS[kind]
                wait_for(lambda v=v: v in worker.watcher.refused, 60, 0.05, f"refusal of {v}")
        expected = stream.finish()
        n_input = wait_all_committed(broker.bootstrap, topics)
    finally:
        worker.request_stop()
        thread.join(timeout=60)
    assert not thread.is_alive()
    events = scored_ids(broker.bootstrap, topics["output"], n_input)
    lost, dups = loss_and_duplicates(events, expected)
    n_bad = sum(k != "good" for k in kinds)
    record_row(
        request,
        fault=f"reload storm ({publications} publications, {n_bad} hostile)",
        records=len(expected),
        faults=publications,
        lost=lost,
        duplicates=dups,
        recovery_s=0.0,
        wall_s=round(time.monotonic() - t_start, 1),
    )
    assert lost == 0
    assert not canary.exists(), "a pickle payload was unpickled"
    served = {e["model"]["version"] for e in events}
    assert not served & set(refused_versions), "an event names a refused version"
    assert served <= good_versions
    assert worker.watcher.refused == refused_versions
    reg = worker.metrics.registry
    for reason in set(BAD_KINDS.values()):
        got = reg.get_sample_value(
            "cae_model_reloads_total", {"result": "refused", "reason": reason}
        )
        assert got == sum(r == reason for r in refused_versions.values()), reason
    swapped = reg.get_sample_value("cae_model_reloads_total", {"result": "swapped", "reason": ""})
    assert swapped == len(good_versions) - 1
    assert worker.summary.publish_failures == 0


# -- 5. hostile input ---------------------------------------------------------------------

_finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
_int64 = st.integers(-(2**63), 2**63 - 1)
_json_scalars = st.none() | st.booleans() | _int64 | _finite32 | st.text(max_size=10)
_json = st.recursive(
    _json_scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)


def _hostile():
    """(value, headers) pairs that can never be a valid record, each by construction."""
    f32 = [(codec.CONTENT_TYPE, codec.FLOAT32)]
    return st.one_of(
        # not UTF-8 and not JSON: a first byte >= 0x80 can start no JSON text
        st.binary(max_size=300).map(lambda b: (b"\xff" + b, None)),
        # valid JSON of the wrong shape: neither an array nor an object with features
        _json.filter(
            lambda v: not isinstance(v, list) and not (isinstance(v, dict) and "features" in v)
        ).map(lambda v: (orjson.dumps(v), None)),
        # arrays of the wrong length, or holding something that is not a number
        st.lists(_finite32, max_size=3 * DIM)
        .filter(lambda v: len(v) != DIM)
        .map(lambda v: (orjson.dumps(v), None)),
        st.tuples(
            st.lists(_finite32, min_size=DIM - 1, max_size=DIM - 1),
            _json_scalars.filter(lambda x: not isinstance(x, int | float) or isinstance(x, bool)),
            st.integers(0, DIM - 1),
        ).map(lambda t: (orjson.dumps({"features": t[0][: t[2]] + [t[1]] + t[0][t[2] :]}), None)),
        # feature maps with names missing or unknown
        st.dictionaries(
            st.sampled_from([*FEATURES, "bogus", "s99", ""]), _finite32, max_size=DIM + 2
        )
        .filter(lambda d: set(d) != set(FEATURES))
        .map(lambda d: (orjson.dumps({"features": d}), None)),
        # float32 vectors: wrong byte length, or a NaN / Inf inside
        st.binary(max_size=12 * DIM).filter(lambda b: len(b) != 4 * DIM).map(lambda b: (b, f32)),
        st.tuples(
            st.lists(_finite32, min_size=DIM, max_size=DIM),
            st.integers(0, DIM - 1),
            st.sampled_from([float("nan"), float("inf"), float("-inf")]),
        ).map(
            lambda t: (
                np.array(t[0][: t[1]] + [t[2]] + t[0][t[1] + 1 :], dtype="<f4").tobytes(),
                f32,
            )
        ),
        # an unknown content type
        st.binary(max_size=64).map(lambda b: (b, [(codec.CONTENT_TYPE, b"application/x-pickle")])),
        # too large
        st.integers(4097, 9000).map(lambda n: (b"[" + b"1," * (n // 2) + b"1]", None)),
    )


def hostile_payloads(n: int) -> list[tuple[bytes, list | None]]:
    """n payloads drawn by Hypothesis (derandomized: the same list every run)."""
    out: list = []

    @settings(
        max_examples=n,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(_hostile())
    def collect(payload):
        out.append(payload)

    collect()
    return out


@pytest.mark.parametrize("counts", sizes((300, 200, 400), (3000, 2000, 5000)))
def test_hostile_input_is_dead_lettered_and_valid_records_are_all_scored(
    request, broker, topics, model_dir, counts
):
    n_hyp, n_random, n_valid = counts
    rng = np.random.default_rng(SEED)
    hostile = hostile_payloads(n_hyp)
    assert len(hostile) >= n_hyp * 0.8
    for _ in range(n_random):  # raw random bytes, first byte >= 0x80
        size = int(rng.integers(1, 2000))
        data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
        hostile.append((bytes([0x80 | data[0]]) + data[1:], None))
    bad = [(f"bad{i}".encode(), v, h) for i, (v, h) in enumerate(hostile)]
    good_rows = normal_rows(n_valid, seed=9)
    good = [
        (f"good{i}".encode(), codec.encode_json(r, id=f"good{i}"), None)
        for i, r in enumerate(good_rows)
    ]
    mixed = bad + good
    random.Random(SEED).shuffle(mixed)
    p = producer(broker.bootstrap)
    for key, value, headers in mixed:
        p.send(topics["input"], key=key, value=value, headers=headers)
    p.flush()
    p.close()
    total = len(mixed)
    worker = Worker(
        settings_for(broker.bootstrap, topics, model_dir, max_records=total, max_record_bytes=4096)
    )
    summary = worker.run()
    assert summary.records == total
    assert summary.rejected == len(bad)
    assert summary.rows == n_valid

    dlq = read_topic(broker.bootstrap, topics["dlq"], expect=len(bad), timeout_s=60)
    events = scored_ids(broker.bootstrap, topics["output"], n_valid)
    sent = {k: v for k, v, _ in bad}
    assert len(dlq) == len(bad)
    assert {r.key for r in dlq} == set(sent)
    reasons = Counter()
    for r in dlq:
        h = dict(r.headers)
        assert r.value == sent[r.key]
        assert h["error"].decode() in codec.REASONS
        assert h["error.detail"]
        assert h["source.topic"].decode() == topics["input"]
        reasons[h["error"].decode()] += 1
    assert len(events) == n_valid
    assert {e["id"] for e in events} == {f"good{i}" for i in range(n_valid)}
    record_row(
        request,
        fault=f"hostile input ({len(bad)} bad: {dict(sorted(reasons.items()))})",
        records=total,
        faults=len(bad),
        lost=n_valid - len({e["id"] for e in events}),
        duplicates=len(events) - len({e["event_id"] for e in events}),
        recovery_s=0.0,
    )


# -- 6. SIGTERM under load ------------------------------------------------------------------


@pytest.mark.parametrize("rounds", sizes(1, 5))
def test_sigterm_under_load_drains_and_a_restart_finishes_the_rest(
    request, broker, topics, model_dir, tmp_path, rounds
):
    grace_s = 20
    rng = random.Random(f"{SEED}-sigterm")
    env = worker_env(broker.bootstrap, topics, model_dir, WORKER_EMIT="all")
    stream = Stream(broker.bootstrap, topics["input"], rate=600)
    stream.start()
    drains = []
    for k in range(rounds):
        log = tmp_path / f"w{k}.log"
        proc = start_worker(env, log)
        before = committed_total(broker.bootstrap, topics)
        wait_for(
            lambda b=before: committed_total(broker.bootstrap, topics) > b, 120, 0.2, tail(log)
        )
        time.sleep(rng.uniform(0.5, 3.0))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=grace_s)
        drains.append(time.monotonic() - t0)
        assert rc == 0, tail(log)
        text = log.read_text()
        assert '"event": "worker_stopped"' in text and "Traceback" not in text
        # everything consumed up to the commit point has its event
        committed = committed_offsets(broker.bootstrap, topics["group"], topics["input"])
        events = scored_ids(broker.bootstrap, topics["output"], sum(committed.values()))
        have = {(e["source"]["partition"], e["source"]["offset"]) for e in events}
        need = {(p, o) for p, end in committed.items() for o in range(end)}
        assert need <= have, f"{len(need - have)} committed records without an event"
    proc = start_worker(env, tmp_path / "final.log")
    time.sleep(2)
    expected = stream.finish()
    t_restart = time.monotonic()
    n_input = wait_all_committed(broker.bootstrap, topics)
    recovery_s = time.monotonic() - t_restart
    assert stop_worker(proc) == 0
    events = scored_ids(broker.bootstrap, topics["output"], n_input)
    lost, dups = loss_and_duplicates(events, expected)
    record_row(
        request,
        fault=f"SIGTERM under load ×{rounds} (drain ≤ {max(drains):.1f}s)",
        records=len(expected),
        faults=rounds,
        lost=lost,
        duplicates=dups,
        recovery_s=round(recovery_s, 1),
    )
    assert lost == 0
    assert max(drains) < grace_s


# -- 7. soak -------------------------------------------------------------------------------


def _proc_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return {
        "t": time.monotonic(),
        "rss_mb": rss_kb / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }


@dataclass(frozen=True)
class SoakSize:
    seconds: float
    reload_every_s: float
    warmup_s: float


@pytest.mark.soak  # the 30 s variant alone would take a quarter of `make test`'s budget
@pytest.mark.parametrize(
    "size",
    sizes(
        SoakSize(seconds=30, reload_every_s=5, warmup_s=10),
        SoakSize(seconds=600, reload_every_s=30, warmup_s=120),
    ),
)
def test_soak_steady_stream_with_reloads_does_not_leak(
    request, broker, topics, model_dir, trained, tmp_path, size
):
    second = trained[2]
    log = tmp_path / "w.log"
    proc = start_worker(
        worker_env(
            broker.bootstrap, topics, model_dir, WORKER_EMIT="all", WORKER_RELOAD_POLL_S="1"
        ),
        log,
    )
    # Batched on the producer side as a real high-rate producer would: the embedded
    # broker's memory storage slows to a stall after ~10^5 one-record batches.
    stream = Stream(broker.bootstrap, topics["input"], rate=300, linger_ms=100)
    stream.start()
    try:
        wait_for(lambda: committed_total(broker.bootstrap, topics) > 0, 120, 0.5, tail(log))
        t0 = time.monotonic()
        next_reload = t0 + size.reload_every_s
        samples, reloads = [], 0
        while time.monotonic() - t0 < size.seconds:
            if time.monotonic() >= next_reload:
                publish(model_dir, second.model, second.manifest)
                reloads += 1
                next_reload += size.reload_every_s
            samples.append({**_proc_stats(proc.pid), "elapsed": time.monotonic() - t0})
            time.sleep(2)
        expected = stream.finish()
        n_input = wait_all_committed(broker.bootstrap, topics, timeout_s=600)
        assert stop_worker(proc) == 0, tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = scored_ids(broker.bootstrap, topics["output"], n_input)
    lost, dups = loss_and_duplicates(events, expected)
    swaps = sum(1 for e in log_events(log) if e.get("event") == "model_serving") - 1
    # stationary traffic: no drift incident (docs/contract.md#drift), none published
    drift_opened = [e for e in log_events(log) if e.get("event") == "drift_opened"]
    stopped = [e for e in log_events(log) if e.get("event") == "worker_stopped"][-1]
    drift_tests = stopped["drift"][topics["input"]]["tests"]
    incidents = read_topic(broker.bootstrap, topics["incidents"], quiet_s=1)
    warm = [s for s in samples if s["elapsed"] >= size.warmup_s]
    base, end = warm[:3], warm[-3:]
    rss0 = sum(s["rss_mb"] for s in base) / len(base)
    rss1 = sum(s["rss_mb"] for s in end) / len(end)
    growth = (rss1 - rss0) / rss0
    fds0, fds1 = max(s["fds"] for s in base), max(s["fds"] for s in end)
    thr0, thr1 = max(s["threads"] for s in base), max(s["threads"] for s in end)
    record_row(
        request,
        fault=f"soak {size.seconds:.0f}s, reload every {size.reload_every_s:.0f}s ({swaps} swaps)",
        records=len(expected),
        faults=reloads,
        lost=lost,
        duplicates=dups,
        recovery_s=0.0,
        rss_mb=f"{rss0:.0f}→{rss1:.0f} ({100 * growth:+.1f}%)",
        fds=f"{fds0}→{fds1}",
        threads=f"{thr0}→{thr1}",
    )
    assert lost == 0
    assert drift_opened == [] and incidents == []
    # a window is tested once it fills under one model: 2 000 records, 6.7 s at 300/s,
    # longer than the short run's reload interval
    assert drift_tests > 0 or size.reload_every_s * 300 < 2000
    assert swaps >= reloads - 1
    assert growth <= 0.05, f"resident memory grew {100 * growth:.1f}% after warm-up"
    assert fds1 <= fds0 + 2, f"file descriptors {fds0} → {fds1}"
    assert thr1 <= thr0 + 1, f"threads {thr0} → {thr1}"


# -- 8. scale-out ----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", sizes(400, 1500))
def test_three_workers_one_killed_one_added_score_everything_exactly_once(
    request, broker, model_dir, tmp_path, rate, hides_aborted
):
    topics = new_topics(broker.bootstrap, partitions=6)
    rng = random.Random(f"{SEED}-scale")

    def env_for(i: int) -> dict:
        return worker_env(
            broker.bootstrap,
            topics,
            model_dir,
            WORKER_EMIT="all",
            WORKER_DELIVERY="exactly-once",
            WORKER_TRANSACTIONAL_ID=f"{topics['group']}-w{i}",
            WORKER_MAX_BATCH_SIZE=200,
        )

    def assigned(log: Path) -> list[dict]:
        return [e for e in log_events(log) if e.get("event") == "partitions_assigned"]

    logs = {i: tmp_path / f"w{i}.log" for i in range(4)}
    procs = {i: start_worker(env_for(i), logs[i]) for i in range(3)}
    stream = Stream(broker.bootstrap, topics["input"], rate=rate)
    try:
        wait_for(
            lambda: all(
                assigned(logs[i]) and assigned(logs[i])[-1]["partitions"] for i in range(3)
            ),
            150,
            0.5,
            "three workers with partitions",
        )
        stream.start()
        wait_for(lambda: committed_total(broker.bootstrap, topics) > 500, 120, 0.5, "progress")
        victim = rng.randrange(3)
        time.sleep(rng.uniform(0.0, 2.0))
        procs[victim].kill()
        procs[victim].wait()
        t_kill = time.monotonic()
        # the replacement takes over the dead worker's transactional id, fencing its
        # open transaction (as a restarted pod of a StatefulSet would)
        procs[3] = start_worker(
            {**env_for(victim), "WORKER_TRANSACTIONAL_ID": f"{topics['group']}-w{victim}"},
            logs[3],
        )
        wait_for(lambda: assigned(logs[3]), 150, 0.5, "the new worker gets partitions")
        before = committed_total(broker.bootstrap, topics)
        wait_for(
            lambda: committed_total(broker.bootstrap, topics) > before + 200, 120, 0.5, "progress"
        )
        recovery_s = time.monotonic() - t_kill
        expected = stream.finish()
        n_input = wait_all_committed(broker.bootstrap, topics)
        # Read the split while the group is stable: once the workers stop one after
        # another, each stop rebalances the rest and a worker stopped mid-rebalance
        # never logs its last share, so the logs no longer describe one generation.
        survivors = [i for i in procs if i != victim]

        def split() -> list[set]:
            return [set(assigned(logs[i])[-1]["partitions"]) for i in survivors]

        wait_for(
            lambda: sum(map(len, split())) == 6 and len(set().union(*split())) == 6,
            60,
            0.5,
            "the three live workers to own the six partitions between them",
        )
        shares = split()
        for i, p in procs.items():
            if i != victim:
                assert stop_worker(p) == 0, tail(logs[i])
        n_input = committed_total(broker.bootstrap, topics)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    events = scored_ids(broker.bootstrap, topics["output"], n_input, "read_committed")
    lost, dups = loss_and_duplicates(events, expected)
    record_row(
        request,
        fault="3 workers, kill -9 one, add one (exactly-once)",
        records=len(expected),
        faults=1,
        lost=lost,
        duplicates=dups,
        recovery_s=round(recovery_s, 1),
        **({"aborted_visible": "yes (Tansu)"} if not hides_aborted else {}),
    )
    assert all(shares), f"a live worker holds no partition: {shares}"
    assert lost == 0
    assert_exactly_once(events, n_input, hides_aborted, kills=1, batch=200)


# -- 9. a SASL password never leaks ------------------------------------------------------------


def test_sasl_password_never_appears_in_logs_or_metrics(broker, topics, model_dir, tmp_path):
    secret = f"some-secret-{unique('pw')}"
    port = free_port()
    log = tmp_path / "w.log"
    proc = start_worker(
        worker_env(
            broker.bootstrap,
            topics,
            model_dir,
            WORKER_METRICS_PORT=port,
            KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
            KAFKA_SASL_MECHANISM="PLAIN",
            KAFKA_SASL_USERNAME="cae",
            KAFKA_SASL_PASSWORD=secret,
        ),
        log,
    )
    try:
        wait_for(lambda: http_get(port, "/healthz")[0] == 200, 90, 0.5, "health: " + tail(log))

        # the client tries to authenticate, and logs how that went, before it either
        # retries (a second broker_unreachable line) or gets partitions
        def attempts_logged() -> bool:
            events = [e.get("event") for e in log_events(log)]
            return events.count("broker_unreachable") >= 2 or "partitions_assigned" in events

        wait_for(attempts_logged, 90, 0.5, "a finished connection attempt: " + tail(log), proc)
        pages = [http_get(port, p)[1] for p in ("/metrics", "/readyz", "/healthz")]
    finally:
        stop_worker(proc)
    text = log.read_text()
    assert text.strip(), "the worker logged nothing"
    assert secret not in text
    for page in pages:
        assert secret not in page


def test_exactly_once_output_known_at_start_is_not_forgotten_by_a_refresh_for_another(broker):
    """The first transaction's stall (docs/benchmarks.md, "A stall seen in these runs"):
    Tansu answers the producer's bootstrap request for no topics with every topic, so an
    output topic created before the worker is known without being tracked; a send to a
    topic the producer does not know yet (here created after the producer's start, in
    the worker an auto-created incident topic) refreshes the metadata of that topic
    alone, which forgets the first one's partitions, and its batch (held back by
    linger_ms until then) waits for a leader that no refresh asks for until it expires
    (delivery_timeout_ms, 120 s). The worker's sends track every topic they write to."""
    events, state = unique("events"), unique("state")
    create_topics(broker.bootstrap, [events], partitions=1)
    p = producer(
        broker.bootstrap,
        transactional_id=unique("tx"),
        enable_idempotence=True,
        linger_ms=2_000,  # the events' batch is still unsent when the state topic's refresh ends
    )
    try:
        p.init_transactions()
        assert p.partitions_for(events) == {0}  # known from the bootstrap alone
        create_topics(broker.bootstrap, [state], partitions=1)
        p.begin_transaction()
        topics = OutputTopics(events=events, dlq=events, incidents=events, state=state)
        futures = _send(
            p, BatchOutcome([], [(b"k", b"event", [])], [], {}), topics, KeyPartitions()
        )
        futures += _send_state(p, [(0, b"k", b"s")], state)
        p.flush(timeout=15)  # raises KafkaTimeoutError when the events' batch stalls
        p.commit_transaction()
        assert all(f.succeeded() for f in futures)
    finally:
        p.close(timeout=5)
