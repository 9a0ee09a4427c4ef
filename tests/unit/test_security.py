"""Security properties: nothing ever unpickles, the health port serves three paths only,
secrets stay secret, the container does not run as root."""

from __future__ import annotations

import ast
import http.client
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import PickleCanary
from worker.checkpoint import publish, read_checkpoint
from worker.datafile import load_dataset
from worker.health import Health, HealthServer
from worker.metrics import WorkerMetrics
from worker.scoring import load_scorer
from worker.settings import KafkaSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "training")
SECRET = "s3cr3t-sasl-pa55word"

# -- nothing unpickles ----------------------------------------------------------------------

_PICKLING_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "joblib",
    "shelve",
    "marshal",
    "cloudpickle",
}


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_no_package_module_can_unpickle():
    """AST scan: no pickling module imported, no torch.load, every np.load says
    allow_pickle=False, no pandas read_pickle."""
    offences = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in _PICKLING_MODULES:
                        offences.append(f"{where}:{node.lineno}: import {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                if (node.module or "").split(".")[0] in _PICKLING_MODULES:
                    offences.append(f"{where}:{node.lineno}: from {node.module} import")
                if node.module == "torch" and any(a.name == "load" for a in node.names):
                    offences.append(f"{where}:{node.lineno}: from torch import load")
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name in ("torch.load", "read_pickle") or name.endswith(".read_pickle"):
                    offences.append(f"{where}:{node.lineno}: {name}(...)")
                if name in ("np.load", "numpy.load"):
                    kw = {k.arg: k.value for k in node.keywords}
                    safe = isinstance(kw.get("allow_pickle"), ast.Constant) and (
                        kw["allow_pickle"].value is False
                    )
                    if not safe:
                        offences.append(f"{where}:{node.lineno}: {name} without allow_pickle=False")
    assert not offences, "\n".join(offences)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("models")
    return root, publish(root, tiny_model.model, tiny_model.manifest)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickling entry point raises for the duration of the test."""

    def refuse(*_a, **_k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_loading_a_checkpoint_never_unpickles(tiny_checkpoint, no_unpickling):
    root, version = tiny_checkpoint
    read_checkpoint(root / version)
    load_scorer(root / version)


def test_object_npy_data_files_are_refused_without_running(tmp_path):
    canary = tmp_path / "canary"
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = PickleCanary(canary), PickleCanary(canary)
    np.save(tmp_path / "evil.npy", arr, allow_pickle=True)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing ran
        load_dataset(tmp_path / "evil.npy")
    assert not canary.exists(), "the pickle in the .npy ran"


# -- the health port serves three paths and nothing else ----------------------------------


@pytest.fixture(scope="module")
def health():
    health = Health(WorkerMetrics())
    health.set_ready(True)
    server = HealthServer(health, "127.0.0.1", 0).start()
    yield server
    server.stop()


def _request(port: int, method: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_health_port_serves_its_three_paths(health):
    assert _request(health.port, "GET", "/metrics")[0] == 200
    assert _request(health.port, "GET", "/healthz")[0] == 200
    assert _request(health.port, "GET", "/readyz")[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/index.html",
        "/metrics/",
        "/metrics/../../etc/passwd",
        "/../../../../etc/passwd",
        "/..%2f..%2f..%2fetc%2fpasswd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "//etc/passwd",
        "/healthz/../metrics/../../worker/settings.py",
        "/worker/settings.py",
        "/.env",
        "/debug/pprof",
        "/METRICS",
        "/metrics%00",
        "/readyz;x",
    ],
)
def test_health_port_404s_everything_else(health, path):
    status, body = _request(health.port, "GET", path)
    assert status == 404, (path, status)
    assert body == b"not found\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"])
@pytest.mark.parametrize("path", ["/metrics", "/readyz", "/"])
def test_health_port_answers_no_other_method(health, method, path):
    status, body = _request(health.port, method, path)
    assert status in (404, 405, 501), (method, path, status)
    assert b"cae_" not in body and b"ready" not in body


# -- secrets ----------------------------------------------------------------------------------


def _sasl_settings() -> WorkerSettings:
    return WorkerSettings(
        kafka=KafkaSettings(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_username="cae",
            sasl_password=SECRET,
        )
    )


def test_sasl_password_is_not_in_repr_str_or_dump():
    s = _sasl_settings()
    for text in (repr(s), str(s), repr(s.kafka), s.model_dump_json(), str(s.model_dump())):
        assert SECRET not in text
    # the client still gets it, and only there
    assert s.kafka.client_kwargs()["sasl_plain_password"] == SECRET


def test_sasl_password_from_the_environment_is_masked_in_the_error_line(monkeypatch):
    from pydantic import ValidationError

    from worker.settings import settings_error_line

    monkeypatch.setenv("KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "NOT-A-MECHANISM")
    with pytest.raises(ValidationError) as e:
        WorkerSettings()
    line = settings_error_line(e.value, "WORKER_")
    assert SECRET not in line and "KAFKA_SASL_MECHANISM" in line


# -- the container --------------------------------------------------------------------------


def test_container_runs_as_a_non_root_user():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    final_stage = re.split(r"(?im)^FROM\s", text)[-1]
    users = re.findall(r"(?im)^USER\s+(\S+)", final_stage)
    assert users, "the runtime stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    if user.startswith("${"):  # a build arg: its default must not be root either
        name = user.strip("${}").split(":-")[0]
        default = re.search(rf"(?im)^ARG\s+{name}=(\S+)", final_stage)
        assert default and default.group(1) not in ("0", "root"), default
