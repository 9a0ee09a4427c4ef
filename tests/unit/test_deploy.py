"""The deployment files: docker-compose.yml, deploy/Dockerfile, deploy/prometheus.yml.

No Docker engine runs these tests. The compose file is loaded the way Compose loads it
(YAML with merge keys, then `${VAR:-default}` interpolation with the defaults, as on a
machine with no `.env`) and validated against the Compose specification by compose-spec.
What each service runs is then checked against the code it runs: its environment against
the settings class of that process, its command against that module's CLI. The last test
runs the compose worker's exact command and environment against an embedded broker.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dockerfile
import numpy as np
import pytest
import yaml
from compose_spec import PyCompose, parse_duration
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from tests.integration.kafka_helpers import metric_total
from tests.support import wait_for
from training.settings import TrainerSettings, parse_cli
from worker.settings import KafkaSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"

# Services that run the cae-stream image, by the module their command runs.
SETTINGS_BY_MODULE: dict[str, tuple[type[BaseSettings], ...]] = {
    "worker": (WorkerSettings, KafkaSettings),
    "training": (TrainerSettings, KafkaSettings),
    "deploy.init_topics": (KafkaSettings,),
    "deploy.demo_producer": (KafkaSettings,),
    "deploy.alert_consumer": (KafkaSettings,),
}
OUR_PREFIXES = ("WORKER_", "TRAINER_", "KAFKA_")

_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


# -- loading the compose file as Compose does ----------------------------------------------


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$`, on every string."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, default = m["name"], m["op"], m["default"] or ""
        if name in env and (env[name] != "" or op != ":-"):
            return env[name]
        return default if op else ""

    return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def load_compose(text: str | None = None, env: dict[str, str] | None = None) -> dict:
    raw = yaml.safe_load(COMPOSE_FILE.read_text() if text is None else text)
    return interpolate(raw, env)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def our_services(compose: dict) -> dict[str, dict]:
    """Services running the cae-stream image (built from deploy/Dockerfile)."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if (svc.get("build") or {}).get("dockerfile") == "deploy/Dockerfile"
    }


def module_of(svc: dict) -> str:
    return svc["command"][0]  # the image's entrypoint is `python -m`


def env_of(svc: dict) -> dict[str, str]:
    """The environment the container gets on a host that sets none of the pass-through names."""
    env = svc.get("environment") or {}
    assert isinstance(env, dict), "environment is written as a map"
    return {k: str(v) for k, v in env.items() if v is not None}


def env_names(settings_cls: type[BaseSettings]) -> set[str]:
    """The variables a settings class reads: env_prefix + field name, nested models excluded."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in settings_cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            continue  # read by its own class (e.g. kafka → KafkaSettings, KAFKA_*)
        names.add((prefix + name).upper())
    return names


def build_settings(monkeypatch, settings_cls: type[BaseSettings], env: dict[str, str], args=()):
    for name in list(os.environ):
        if name.startswith(OUR_PREFIXES):
            monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if settings_cls is TrainerSettings:
        return parse_cli(list(args))
    return settings_cls()


# -- the compose file ---------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification(compose):
    spec = PyCompose.from_json(json.dumps(compose))
    spec.validate()
    spec.validate_networks()
    spec.validate_volumes()
    assert {"kafka", "kafka-init", "trainer", "worker"} <= set(spec.service_names())


def test_the_validator_is_not_vacuous(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["stop_grace_period"] = "thirty seconds"
    with pytest.raises(ValueError, match="stop_grace_period|duration"):
        PyCompose.from_json(json.dumps(broken))


def test_every_compose_variable_has_a_default():
    """`docker compose up` works with no .env: every ${VAR} carries a default."""
    text = COMPOSE_FILE.read_text()
    bare = [m[0] for m in _VAR.finditer(text) if m["op"] is None]
    assert not bare, f"variables without a default: {bare}"


def test_overrides_reach_the_services():
    compose = load_compose(env={"PARTITIONS": "12", "TRAINER_EVERY_SECONDS": "600"})
    assert "12" in compose["services"]["kafka-init"]["command"]
    assert compose["services"]["trainer"]["environment"]["TRAINER_EVERY_SECONDS"] == "600"


def test_each_service_env_is_a_setting_of_the_process_it_runs(compose, monkeypatch):
    services = our_services(compose)
    assert set(services) >= {"kafka-init", "trainer", "worker", "worker-gpu", "producer", "alerts"}
    for name, svc in services.items():
        module = module_of(svc)
        assert module in SETTINGS_BY_MODULE, f"{name}: unknown module {module!r}"
        known = set().union(*(env_names(cls) for cls in SETTINGS_BY_MODULE[module]))
        unknown = sorted(set(svc.get("environment") or {}) - known)
        assert not unknown, f"{name} ({module}) sets variables no settings class reads: {unknown}"


def test_each_service_env_and_command_are_valid_settings(compose, monkeypatch):
    """The values too: each process would start with the compose defaults."""
    for name, svc in our_services(compose).items():
        module, args, env = module_of(svc), svc["command"][1:], env_of(svc)
        primary = SETTINGS_BY_MODULE[module][0]
        settings = build_settings(monkeypatch, primary, env, args if module == "training" else ())
        if module == "worker":
            assert settings.model_dir == Path("/models"), name
        if module == "training":
            assert settings.out == Path("/models"), name


def test_deploy_tool_commands_parse(compose):
    for name, svc in our_services(compose).items():
        module = module_of(svc)
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
        if module.startswith("deploy."):
            importlib.import_module(module).parse_args(svc["command"][1:])


def test_worker_scales(compose):
    for name in ("worker", "worker-gpu"):
        svc = compose["services"][name]
        assert "container_name" not in svc, f"{name}: a fixed name cannot be scaled"
        assert "ports" not in svc, f"{name}: a published host port cannot be scaled"
        assert svc["command"] == ["worker"]
        assert parse_duration(svc["stop_grace_period"]) >= 20, "the drain needs time"
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "worker", "--check"]
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
        assert svc["environment"]["WORKER_METRICS_PORT"] in {str(p) for p in svc["expose"]}


def test_gpu_worker(compose, monkeypatch):
    svc = compose["services"]["worker-gpu"]
    assert svc["profiles"] == ["gpu"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    settings = build_settings(monkeypatch, WorkerSettings, env_of(svc))
    assert settings.device == "cuda"
    assert svc["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    cpu = compose["services"]["worker"]
    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert env_of(svc)["WORKER_GROUP_ID"] == env_of(cpu)["WORKER_GROUP_ID"], "one consumer group"


def test_topic_init_creates_the_worker_topics(compose, monkeypatch):
    init = compose["services"]["kafka-init"]
    args = __import__("deploy.init_topics", fromlist=["parse_args"]).parse_args(init["command"][1:])
    worker = build_settings(monkeypatch, WorkerSettings, env_of(compose["services"]["worker"]))
    assert set(args.topics) == {
        worker.input_topic,
        worker.output_topic,
        worker.dlq_topic,
        worker.incident_topic,
    }
    # the incidents' changelog: compacted, as many partitions as the input
    assert args.compact == [worker.incident_state_topic]
    assert args.partitions == 6, "default PARTITIONS"
    assert "${PARTITIONS:-" in COMPOSE_FILE.read_text()
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_kafka_is_single_node_kraft_with_a_health_check(compose):
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])
    # Replication factors a single node can satisfy (consumer groups, transactions).
    assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 1
    assert int(env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"]) == 1
    bootstrap = compose["services"]["worker"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
    assert f"PLAINTEXT://{bootstrap}" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")


def test_trainer_retrains_from_the_stream_into_the_shared_volume(compose, monkeypatch):
    svc = compose["services"]["trainer"]
    settings = build_settings(monkeypatch, TrainerSettings, env_of(svc), svc["command"][1:])
    assert settings.from_kafka and settings.every_seconds
    worker = build_settings(monkeypatch, WorkerSettings, env_of(compose["services"]["worker"]))
    assert settings.incident_topic == worker.incident_topic  # retrains on the workers' drift

    def mount_of(svc: dict) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}

    volumes = compose["volumes"]
    for name in ("trainer", "trainer-bootstrap"):
        assert mount_of(compose["services"][name])[str(settings.out)] in volumes
    for name in ("worker", "worker-gpu"):
        mounts = mount_of(compose["services"][name])
        model_dir = compose["services"][name]["environment"]["WORKER_MODEL_DIR"]
        assert mounts[model_dir] == mount_of(svc)[str(settings.out)], "the same named volume"


def test_secrets_are_passed_through_not_written(compose):
    for name, svc in our_services(compose).items():
        env = svc.get("environment") or {}
        if "KAFKA_SASL_PASSWORD" in env:
            assert env["KAFKA_SASL_PASSWORD"] is None, f"{name}: a password in the compose file"


def test_profiles(compose):
    profiles = {n: s.get("profiles", []) for n, s in compose["services"].items()}
    assert profiles["producer"] == profiles["alerts"] == ["demo"]
    assert profiles["prometheus"] == ["observability"]
    for name in ("kafka", "kafka-init", "trainer", "worker"):
        assert profiles[name] == [], f"{name} runs by default"


# -- Prometheus -----------------------------------------------------------------------------


def test_prometheus_scrapes_every_worker_replica(compose):
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cae-worker"]
    (sd,) = job["dns_sd_configs"]
    assert sd.get("type", "SRV") == "A"
    for name in ("worker", "worker-gpu"):
        svc = compose["services"][name]
        aliases = svc["networks"]["default"]["aliases"]
        assert set(sd["names"]) & ({name} | set(aliases)), f"{name} is not scraped"
        assert sd["port"] == int(svc["environment"]["WORKER_METRICS_PORT"])
    assert job.get("metrics_path", "/metrics") == "/metrics"
    prom = compose["services"]["prometheus"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]


# -- the Dockerfile -------------------------------------------------------------------------


def runtime_stage() -> list[dockerfile.Command]:
    """The final stage's instructions, parsed by BuildKit's own parser."""
    commands = dockerfile.parse_file(str(DOCKERFILE))
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return list(commands[last_from:])


def stage_args(stage: list[dockerfile.Command]) -> dict[str, str]:
    """The stage's ARG defaults (what a build without --build-arg uses)."""
    return dict(a.split("=", 1) for c in stage if c.cmd == "ARG" for a in c.value if "=" in a)


def stage_env(stage: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for c in stage:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    return env


def the_only(stage: list[dockerfile.Command], cmd: str) -> dockerfile.Command:
    (found,) = [c for c in stage if c.cmd == cmd]
    return found


def test_the_image_runs_the_worker():
    stage = runtime_stage()
    entrypoint, command = the_only(stage, "ENTRYPOINT"), the_only(stage, "CMD")
    assert entrypoint.json and command.json, "exec form: SIGTERM reaches python, not a shell"
    assert [*entrypoint.value, *command.value] == ["python", "-m", "worker"]
    assert the_only(stage, "STOPSIGNAL").value == ("SIGTERM",), "the signal the worker drains on"


def test_the_healthcheck_runs_the_worker_check():
    healthcheck = the_only(runtime_stage(), "HEALTHCHECK")
    assert healthcheck.value == ("CMD", "python", "-m", "worker", "--check")


def test_the_image_runs_as_a_non_root_user():
    stage = runtime_stage()
    user = the_only(stage, "USER").value[0]
    args = stage_args(stage)
    uid = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], user).split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user} (uid {uid})"


def test_the_image_env_names_are_settings():
    known = env_names(WorkerSettings) | env_names(TrainerSettings) | env_names(KafkaSettings)
    ours = [name for name in stage_env(runtime_stage()) if name.startswith(OUR_PREFIXES)]
    assert ours and set(ours) <= known, sorted(set(ours) - known)


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Whether `path` (relative, '/'-separated) is in the build context: the last pattern
    matching it or one of its parent directories decides; `!` patterns let it back in."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        rx = regex(pattern.removeprefix("!").strip("/"))
        if any(rx.fullmatch(prefix) for prefix in prefixes):
            allowed = keep
    return allowed


def test_every_copy_source_is_in_the_build_context():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    copies = [
        c
        for c in dockerfile.parse_file(str(DOCKERFILE))
        if c.cmd in ("COPY", "ADD") and not any(f.startswith("--from=") for f in c.flags)
    ]
    assert copies
    for copy_ in copies:
        for src in copy_.value[:-1]:
            src_path = ROOT / src
            assert src_path.exists(), f"COPY {src}: no such file"
            files = (
                [f for f in src_path.rglob("*") if f.is_file()] if src_path.is_dir() else [src_path]
            )
            files = [f for f in files if "__pycache__" not in f.parts]
            assert files, f"COPY {src}: nothing to copy"
            dropped = [
                str(f.relative_to(ROOT))
                for f in files
                if not dockerignore_allows(f.relative_to(ROOT).as_posix(), patterns)
            ]
            assert not dropped, f"COPY {src}: .dockerignore leaves out {dropped[:5]}"


def test_the_dockerignore_check_is_not_vacuous():
    patterns = ["*", "!worker/", "**/__pycache__"]
    assert dockerignore_allows("worker/service.py", patterns)
    assert not dockerignore_allows("training/cli.py", patterns)
    assert not dockerignore_allows("worker/__pycache__/x.pyc", patterns)


# -- the deploy tools (pure parts) --------------------------------------------------------


def test_demo_stream_injects_anomalies_at_the_rate_asked():
    from deploy.demo_producer import FeatureStream

    rows, anomalous = FeatureStream(dim=8, anomaly_rate=0.1, seed=1).rows(5000)
    assert rows.shape == (5000, 8) and rows.dtype == np.float32
    assert 0.08 < anomalous.mean() < 0.12
    normal, none = FeatureStream(dim=8, anomaly_rate=0.0, seed=1).rows(100)
    assert not none.any()
    assert np.array_equal(normal, FeatureStream(dim=8, anomaly_rate=0.0, seed=1).rows(100)[0])


def test_alert_consumer_deduplicates_by_event_id():
    from deploy.alert_consumer import RecentIds

    recent = RecentIds(size=2)
    assert not recent.seen("a") and not recent.seen("b")
    assert recent.seen("a")
    assert not recent.seen("c")  # evicts b, the least recently seen
    assert not recent.seen("b")


# -- the compose worker, run for real against an embedded broker ---------------------------


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _container_env(svc_env: dict[str, str]) -> dict[str, str]:
    """What the container sees: the image's ENV, then the service's environment."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    env.update(stage_env(runtime_stage()))
    env["PATH"] = os.environ["PATH"]  # this venv stands in for the image's /opt/venv
    env.update(svc_env)
    return env


@pytest.mark.integration
def test_compose_worker_command_scores_and_drains_on_sigterm(compose, tmp_path):
    from deploy.demo_producer import FeatureStream
    from deploy.embedded_broker import EmbeddedBroker
    from training.fit import TrainConfig, fit
    from worker.checkpoint import publish

    dim = 16  # the demo producer's default width
    x, _ = FeatureStream(dim=dim, anomaly_rate=0.0, seed=7).rows(2000)
    result = fit(x, [f"f{i}" for i in range(dim)], TrainConfig(max_epochs=15, seed=0))
    model_dir = tmp_path / "models"
    publish(model_dir, result.model, result.manifest)

    worker_svc = compose["services"]["worker"]
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        override = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}

        def run_tool(svc_name: str, *extra: str, timeout: float = 60) -> None:
            svc = compose["services"][svc_name]
            env = _container_env({**env_of(svc), **override})
            argv = [sys.executable, "-m", *svc["command"], *extra]
            done = subprocess.run(
                argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
            )
            assert done.returncode == 0, f"{svc_name}: {done.stderr[-2000:]}"

        run_tool("kafka-init")  # the compose command: the worker's three topics

        env = _container_env({**env_of(worker_svc), **override, "WORKER_MODEL_DIR": str(model_dir)})
        port = int(env["WORKER_METRICS_PORT"])
        if not _free(port):  # another process holds 9100 on this machine; the only other change
            port = __import__("deploy.embedded_broker", fromlist=["free_port"]).free_port()
            env["WORKER_METRICS_PORT"] = str(port)
        log_path = tmp_path / "worker.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", *worker_svc["command"]],
                env=env,
                cwd=tmp_path,  # not the repo: `python -m worker` must come from the install
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            healthcheck = [sys.executable, "-m", "worker", "--check"]
            wait_for(
                lambda: (
                    subprocess.run(healthcheck, env=env, capture_output=True, timeout=10).returncode
                    == 0
                ),
                60,
                0.25,
                "the container HEALTHCHECK command to pass",
                proc,
            )
            n = 300
            run_tool("producer", "--count", str(n), "--rate", "2000", "--anomaly-rate", "0.05")
            wait_for(
                lambda: metric_total(port, "cae_records_total") >= n,
                90,
                0.25,
                f"{n} records scored",
                proc,
            )
            assert metric_total(port, "cae_records_total") == n
            assert metric_total(port, "cae_records_total", outcome="rejected") == 0
            assert metric_total(port, "cae_events_published_total") >= 1, (
                "injected anomalies flagged"
            )

            stop_grace = parse_duration(worker_svc["stop_grace_period"])
            t0 = time.monotonic()
            proc.send_signal(getattr(signal, worker_svc.get("stop_signal", "SIGTERM")))
            code = proc.wait(timeout=stop_grace)
            drained_s = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output = log_path.read_text()
        assert code == 0, output[-3000:]
        assert drained_s < stop_grace
        stopped = [json.loads(line) for line in output.splitlines() if '"worker_stopped"' in line]
        assert stopped and stopped[-1]["records"] == n, output[-3000:]
