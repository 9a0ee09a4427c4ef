"""Settings: one frozen pydantic-settings class per process, from the environment.

Tests build them from keyword arguments. An invalid value stops the process at
start with one line naming the variable, the value and what is allowed
(`settings_error_line`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kafka.util import ensure_valid_topic_name
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseSettings):
    """Connection to the brokers; shared by worker and trainer (KAFKA_*)."""

    model_config = SettingsConfigDict(env_prefix="KAFKA_", frozen=True, extra="ignore")

    bootstrap_servers: str = "localhost:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    client_id: str = "cae-stream"

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str) -> str:
        hosts = [h.strip() for h in v.split(",") if h.strip()]
        if not hosts or any(":" not in h or not h.rsplit(":", 1)[1].isdigit() for h in hosts):
            raise ValueError("must be a comma-separated list of host:port")
        return ",".join(hosts)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments common to kafka-python's consumer, producer and admin."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.ssl_cafile:
            kw["ssl_cafile"] = str(self.ssl_cafile)
        return kw


def settings_error_line(exc: ValidationError, env_prefix: str) -> str:
    """One line for the first invalid setting: variable, value, what is allowed."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    prefix = env_prefix
    if exc.title == KafkaSettings.__name__:  # raised from the nested default factory
        prefix = KafkaSettings.model_config["env_prefix"]
    elif loc and loc[0] == "kafka":
        prefix, loc = KafkaSettings.model_config["env_prefix"], loc[1:]
    var = (prefix + "_".join(loc)).upper() if loc else prefix.rstrip("_")
    value = err.get("input")
    if isinstance(value, dict | list):
        value = "(missing)" if not value else value
    if "password" in var.lower():
        value = "**********"
    allowed = err.get("msg", "invalid").removeprefix("Value error, ")
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        allowed = f"allowed: {ctx['expected']}"
    return f"invalid setting {var}={value!r}: {allowed}"


Delivery = Literal["at-least-once", "exactly-once"]
Emit = Literal["anomalies", "all"]


def topic_name(v: str) -> str:
    """A legal Kafka topic name, by kafka-python's own check (the one a send would fail
    on), or ValueError at start-up rather than a traceback at the first send."""
    try:
        ensure_valid_topic_name(v)
    except ValueError:
        raise ValueError(
            f"{v!r} is not a Kafka topic name: 1-249 of ASCII letters, digits, '.', '_', '-'"
        ) from None
    return v


def optional_topic_name(v: str) -> str:
    """A topic name, or empty: the setting off (the model topic of worker and trainer)."""
    return topic_name(v) if v else v


def topic_name_or_none(v: str) -> str:
    """A topic name, or "none" (any case, spaces around it ignored): the setting off
    (the incident topics of worker and trainer)."""
    v = v.strip()
    if not v:
        raise ValueError("a topic name, or none")
    return "none" if v.lower() == "none" else topic_name(v)


class WorkerSettings(BaseSettings):
    """The streaming worker (WORKER_*); every variable: docs/contract.md#settings."""

    model_config = SettingsConfigDict(env_prefix="WORKER_", frozen=True, extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    input_topic: str = "features"
    output_topic: str = "anomalies"
    dlq_topic: str = "features.dlq"
    group_id: str = "cae-worker"
    model_dir: Path = Path("./models")
    # Checkpoints from a compacted Kafka topic instead of the directory (empty: the
    # directory); each verified version is unpacked into the worker's own cache
    # (None: a new temporary directory per process).
    model_topic: str = ""
    model_cache_dir: Path | None = None
    # A micro-batch: at most this many records and, but for its first record, this many
    # bytes of record values (worker/batcher.py). 4096: the loop's fixed cost per batch
    # (every step pays some) spread over more records, docs/benchmarks.md.
    max_batch_size: int = Field(default=4096, ge=1, le=1_000_000)
    max_batch_bytes: int = Field(default=64 << 20, ge=1, le=1 << 34)
    max_batch_wait_ms: int = Field(default=20, ge=0, le=60_000)
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    cuda_graphs: bool = True  # CUDA only: replay captured graphs for common batch sizes
    # CPU threads for the model. One is fastest for micro-batches: more threads fight
    # the Kafka client's own threads (and the broker's) for the cores.
    torch_threads: int = Field(default=1, ge=1, le=256)
    delivery: Delivery = "at-least-once"
    # Exactly-once: one transaction spans the micro-batches of this interval (and at most
    # 4 × max_batch_size records); longer means fewer transactions, later reads.
    # At-least-once: the longest the incident changelog records are held back to be
    # sent coalesced (worker/delivery.py Changelog), and with them those batches' commit.
    commit_interval_ms: int = Field(default=100, ge=0, le=60_000)
    # Compression of the events and DLQ records the worker publishes. Compressed input
    # (any codec) is read transparently.
    compression: Literal["none", "gzip", "lz4", "zstd"] = "none"
    emit: Emit = "anomalies"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    max_record_bytes: int = Field(default=1_048_576, ge=16)
    top_features: int = Field(default=3, ge=0, le=64)
    reload_poll_s: float = Field(default=2.0, gt=0)
    wait_for_model_s: float = Field(default=300.0, ge=0)
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=2_000, ge=100)
    transactional_id: str | None = None
    # Bounded runs (tests, backfills): stop after this many records / this long idle
    # (idle = partitions assigned and no records; the clock restarts on each assignment).
    max_records: int | None = Field(default=None, ge=1)
    idle_timeout_s: float | None = Field(default=None, gt=0)
    # Per-entity incidents (docs/contract.md#incidents); "none" turns them off.
    incident_topic: str = "incidents"
    # The per-key state's changelog (compacted, ≥ the input's partitions); "none": in memory only.
    incident_state_topic: str = "incidents.state"
    # Defaults: 7 anomalous rows of a key's last 35 open an incident. Normal rows' false
    # positives come in bursts (scores are correlated in time), which a shorter window
    # reads as an episode (docs/contract.md#incidents, tests/bench/episodes.py).
    incident_window: int = Field(default=35, ge=1, le=1024)  # rows of a key
    incident_open_share: float = Field(default=0.2, gt=0, le=1)
    incident_update_ms: int = Field(default=10_000, ge=0)  # event time
    incident_quiet_ms: int = Field(default=60_000, ge=1)  # event time
    incident_max_keys: int = Field(default=100_000, ge=1)
    # A continuous feature (Manifest.continuous) that holds one value for this many
    # records of a key in a row makes them anomalous rows of the key's incident
    # (docs/contract.md#stuck-features); 0 turns the check off.
    stuck_records: int = Field(default=5, ge=0, le=1_000_000)

    # Drift (docs/contract.md#drift): a sliding window of this many records per input
    # topic, tested every tenth of it; 0 turns the monitor off.
    drift_window: int = Field(default=2000, ge=0, le=10_000_000)
    drift_level: float = Field(default=6.0, gt=0)
    drift_resolve_level: float = Field(default=3.0, gt=0)
    drift_max_anomaly_share: float = Field(default=0.5, gt=0, le=1)
    # Shadow rollout (docs/contract.md#shadow-rollout): a new checkpoint is scored beside
    # the serving one for this many records before it may serve; 0: promoted at once.
    shadow_records: int = Field(default=0, ge=0)
    shadow_max_rate_factor: float = Field(default=3.0, ge=1)
    # Bearer token for POST /shadow (operators promote or refuse the candidate);
    # unset: the endpoint is off.
    admin_token: SecretStr | None = None

    @field_validator("drift_window")
    @classmethod
    def _drift_window(cls, v: int) -> int:
        if 0 < v < 10:
            raise ValueError("0 (off) or at least 10 records")
        return v

    @field_validator("stuck_records")
    @classmethod
    def _stuck_records(cls, v: int) -> int:
        if v == 1:
            raise ValueError("must be 0 (off) or at least 2: one record cannot repeat")
        return v

    @field_validator("incident_topic", "incident_state_topic")
    @classmethod
    def _incident_topics(cls, v: str) -> str:
        return topic_name_or_none(v)

    @field_validator("input_topic", "output_topic", "dlq_topic")
    @classmethod
    def _topics(cls, v: str) -> str:
        return topic_name(v)

    @field_validator("model_topic")
    @classmethod
    def _model_topic(cls, v: str) -> str:
        return optional_topic_name(v)  # empty: checkpoints from the directory

    @field_validator("drift_resolve_level")
    @classmethod
    def _drift_resolve_level(cls, v: float, info: ValidationInfo) -> float:
        level = info.data.get("drift_level")
        if level is not None and v > level:
            raise ValueError(f"must not exceed WORKER_DRIFT_LEVEL ({level})")
        return v

    @property
    def incidents_on(self) -> bool:
        return self.incident_topic != "none"

    @property
    def incident_state_on(self) -> bool:
        return self.incidents_on and self.incident_state_topic != "none"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("allowed: auto, cpu, cuda, cuda:N")
