"""The trainer's settings: environment (TRAINER_*, KAFKA_*) and CLI flags, one class.

The command line is a hand-written argparse parser (help with the real defaults);
the flags it was given become keyword arguments of the frozen settings, which read
everything else from the environment. Hyper-parameters default to
`training.config.TrainConfig`'s, so the defaults live in one place. Tests build the
settings from keyword arguments. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from training.config import PenaltyMode, ScalerKind, TrainConfig
from worker.model_config import Activation, ScoreKind
from worker.settings import (
    KafkaSettings,
    optional_topic_name,
    settings_error_line,
    topic_name,
    topic_name_or_none,
)

ENV_PREFIX = "TRAINER_"
PROG = "python -m training"
REPORTS_DIRNAME = ".reports"  # dot-prefixed: never mistaken for a checkpoint version

# Settings fields whose TrainConfig name differs.
_TRAIN_CONFIG_NAMES = {"epochs": "max_epochs", "projections": "n_projections"}
HYPER_PARAMETERS = (
    "target_fpr", "penalty_weight", "penalty_mode", "projections", "seed", "epochs",
    "patience", "batch_size", "lr", "code_dim", "hidden", "activation", "scaler",
    "score", "neighbours", "reference_rows",
)  # fmt: skip


def _default(name: str):
    """TrainConfig's default for the settings field `name`."""
    return TrainConfig.model_fields[_TRAIN_CONFIG_NAMES.get(name, name)].default


class TrainerSettings(BaseSettings):
    """What one `python -m training` run does; see build_parser() for each flag."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    # Kafka connection (KAFKA_* only, shared with the worker); used by --from-kafka.
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    data: Path | None = None
    out: Path = Path("./models")
    keep: int = Field(default=5, ge=1)
    report_dir: Path | None = None  # None: OUT/.reports/VERSION
    # Also publish each verified version to this compacted topic (empty: the directory
    # only), in chunks of at most this many bytes (below the broker's message.max.bytes).
    model_topic: str = ""
    model_chunk_bytes: int = Field(default=512 * 1024, ge=1024, le=64 * 1024 * 1024)
    label_column: str | None = None  # None: 'label' if present
    id_column: str | None = None  # None: 'id' if present

    target_fpr: float = Field(default=_default("target_fpr"), gt=0, lt=1)
    penalty_weight: float | Literal["auto"] = _default("penalty_weight")
    penalty_mode: PenaltyMode = _default("penalty_mode")
    projections: int = Field(default=_default("projections"), gt=0)
    seed: int = _default("seed")
    epochs: int = Field(default=_default("epochs"), gt=0)
    patience: int = Field(default=_default("patience"), gt=0)
    batch_size: int = Field(default=_default("batch_size"), gt=0)
    lr: float = Field(default=_default("lr"), gt=0)
    code_dim: int | None = Field(default=_default("code_dim"), gt=0)
    # NoDecode: the variable is "128,64" like the flag, not JSON.
    hidden: Annotated[tuple[int, ...], NoDecode] = _default("hidden")
    activation: Activation = _default("activation")
    scaler: ScalerKind = _default("scaler")
    score: ScoreKind = _default("score")
    neighbours: int = Field(default=_default("neighbours"), gt=0)
    reference_rows: int = Field(default=_default("reference_rows"), gt=0)
    torch_threads: int = Field(default=1, ge=1, le=256)

    # Retraining from the input topic, once or periodically.
    from_kafka: bool = False
    input_topic: str = "features"
    max_records: int = Field(default=20_000, gt=0)
    max_seconds: float = Field(default=120.0, gt=0)
    every_seconds: float | None = Field(default=None, gt=0)  # None: one cycle
    # Retraining on drift (periodic mode): the worker's incident topic, "none": off.
    incident_topic: str = "none"
    drift_delay_seconds: float = Field(default=60.0, ge=0)
    drift_min_interval_seconds: float = Field(default=600.0, ge=0)

    @field_validator("input_topic")
    @classmethod
    def _input_topic(cls, v: str) -> str:
        return topic_name(v)

    @field_validator("model_topic")
    @classmethod
    def _model_topic(cls, v: str) -> str:
        return optional_topic_name(v)  # empty: the directory only

    @field_validator("incident_topic")
    @classmethod
    def _incident_topic(cls, v: str) -> str:
        return topic_name_or_none(v)

    @field_validator("hidden", mode="before")
    @classmethod
    def _hidden(cls, v: object) -> object:
        if isinstance(v, str):
            widths = v.strip().strip("[]()").replace(",", " ").split()
            try:
                return tuple(int(w) for w in widths)
            except ValueError:
                raise ValueError("allowed: layer widths separated by commas, e.g. 128,64") from None
        return v

    @field_validator("penalty_weight", mode="before")
    @classmethod
    def _penalty_weight(cls, v: object) -> object:
        if isinstance(v, int | float):
            weight = v
        elif isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        else:
            try:
                weight = float(str(v))
            except ValueError:
                raise ValueError("allowed: a number ≥ 0 or 'auto'") from None
        if not (weight >= 0 and weight != float("inf")):
            raise ValueError("allowed: a number ≥ 0 or 'auto'")
        return weight

    @model_validator(mode="after")
    def _one_source(self) -> TrainerSettings:
        if self.data is None and not self.from_kafka:
            raise ValueError(f"--data FILE (or {ENV_PREFIX}DATA) is required")
        if self.data is not None and self.from_kafka:
            raise ValueError("give either --data or --from-kafka, not both")
        if self.every_seconds is not None and not self.from_kafka:
            raise ValueError("--every-seconds retrains from the stream: it needs --from-kafka")
        if self.retrain_on_drift and self.every_seconds is None:
            raise ValueError(
                "--incident-topic retrains on drift in periodic mode: it needs --every-seconds"
            )
        return self

    @property
    def retrain_on_drift(self) -> bool:
        return self.incident_topic != "none"

    def train_config(self) -> TrainConfig:
        """The hyper-parameters as TrainConfig names them."""
        return TrainConfig(
            **{
                _TRAIN_CONFIG_NAMES.get(name, name): getattr(self, name)
                for name in HYPER_PARAMETERS
            }
        )

    def report_dir_for(self, version: str) -> Path:
        return (
            self.report_dir if self.report_dir is not None else self.out / REPORTS_DIRNAME / version
        )


class FlagError(Exception):
    """A command line the parser refuses (an unknown flag, a flag without its value)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit
        raise FlagError(message)


def _choices(literal) -> str:
    return "{" + ",".join(get_args(literal)) + "}"


# The flags by group: (flag, metavar, help); "{default}" in a help is the setting's
# default. Each flag's setting is its name without the dashes (--target-fpr → target_fpr).
FLAGS: dict[str, list[tuple[str, str, str]]] = {
    "data and output": [
        (
            "--data",
            "FILE",
            "training data: .csv (header of feature names), .npy, .npz or .parquet; "
            "required unless --from-kafka",
        ),
        (
            "--out",
            "DIR",
            "model directory to publish into, the worker's WORKER_MODEL_DIR {default}",
        ),
        ("--keep", "N", "published versions to keep; older ones are pruned {default}"),
        (
            "--report-dir",
            "DIR",
            f"where report.json and the plots go (default: OUT/{REPORTS_DIRNAME}/VERSION)",
        ),
        (
            "--label-column",
            "NAME",
            "column of 0/1 labels, 1 = anomaly; labelled anomalies are left out of training "
            "and used for the report (default: 'label' if present)",
        ),
        ("--id-column", "NAME", "column of row ids (default: 'id' if present)"),
        (
            "--model-topic",
            "TOPIC",
            "also publish each verified version to this compacted topic, the workers' "
            "WORKER_MODEL_TOPIC (default: the directory only)",
        ),
        (
            "--model-chunk-bytes",
            "N",
            "largest chunk of a version on the model topic; keep it below the broker's "
            "message.max.bytes {default}",
        ),
    ],
    "model and training": [
        ("--target-fpr", "FPR", "false-positive rate the threshold targets {default}"),
        (
            "--penalty-weight",
            "WEIGHT",
            "λ of the contractive penalty, a number ≥ 0 or 'auto' {default}",
        ),
        ("--penalty-mode", _choices(PenaltyMode), "how the penalty is computed {default}"),
        ("--projections", "N", "random projections per row, estimate mode {default}"),
        ("--seed", "N", "random seed; same seed, same data → same model {default}"),
        ("--epochs", "N", "maximum training epochs {default}"),
        ("--patience", "N", "early-stopping patience in epochs {default}"),
        ("--batch-size", "N", "training batch size {default}"),
        ("--lr", "RATE", "Adam learning rate {default}"),
        ("--code-dim", "N", "code width (default: a quarter of the input width, 4 to 128)"),
        (
            "--hidden",
            "N,N,...",
            "encoder hidden layer widths, e.g. 128,64 (default: none, the input feeds the code)",
        ),
        ("--activation", _choices(Activation), "encoder activation {default}"),
        ("--scaler", _choices(ScalerKind), "input scaler {default}"),
        (
            "--score",
            _choices(ScoreKind),
            "how a row is scored: knn = mean distance to its nearest normal training rows "
            "(stored in the checkpoint), mae / mse = the autoencoder's reconstruction error "
            "{default}",
        ),
        ("--neighbours", "K", "k of the knn score {default}"),
        (
            "--reference-rows",
            "N",
            "normal rows the knn score keeps (a seeded sample of N when there are more); "
            "its scoring cost and checkpoint size grow with N {default}",
        ),
        (
            "--torch-threads",
            "N",
            "CPU threads for training; 1 is fastest for small models {default}",
        ),
    ],
    "retraining from the input topic": [
        ("--input-topic", "TOPIC", "the topic to read, the worker's WORKER_INPUT_TOPIC {default}"),
        ("--max-records", "N", "snapshot: at most the newest N records {default}"),
        ("--max-seconds", "S", "snapshot: read for at most S seconds {default}"),
        (
            "--every-seconds",
            "S",
            "retrain every S seconds until SIGTERM (default: once, then exit)",
        ),
        (
            "--incident-topic",
            "TOPIC",
            "with --every-seconds: also retrain when a drift incident on the input topic opens "
            "on this topic, the worker's WORKER_INCIDENT_TOPIC; none: off {default}",
        ),
        (
            "--drift-delay-seconds",
            "S",
            "a drift retrain waits S seconds after the incident opened and trains on every "
            "record since then (the live model's anomalies kept: it no longer fits) {default}",
        ),
        (
            "--drift-min-interval-seconds",
            "S",
            "at most one drift retrain per S seconds {default}",
        ),
    ],
}


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags. A flag not given is left out of the result (argument_default
    SUPPRESS), so the environment and the settings' defaults fill it."""
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} (--data FILE | --from-kafka) [--out DIR] [options]",
        description="Train a contractive autoencoder on normal rows, calibrate its threshold, "
        "publish a verified checkpoint and write a report. stdout: the published version.",
        epilog=f"Every flag can be set in the environment instead: {ENV_PREFIX} and the flag's "
        f"name in capitals (--target-fpr → {ENV_PREFIX}TARGET_FPR); --hidden takes the same "
        "128,64 there. The Kafka connection comes from KAFKA_*, as for the worker.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    fields = TrainerSettings.model_fields
    for title, flags in FLAGS.items():
        group = p.add_argument_group(title)
        if title == "retraining from the input topic":
            group.add_argument(
                "--from-kafka",
                action=argparse.BooleanOptionalAction,
                help="train on a bounded snapshot of the input topic; publish only if not "
                "worse than the live model in --out",
            )
        for flag, metavar, text in flags:
            name = flag[2:].replace("-", "_")
            default = f"(default: {fields[name].default})" if "{default}" in text else ""
            group.add_argument(flag, metavar=metavar, help=text.replace("{default}", default))
    return p


def parse_cli(argv: list[str]) -> TrainerSettings:
    """Settings from the command line and the environment. Raises FlagError for a
    command line argparse refuses and ValidationError for a value the settings refuse."""
    given = vars(build_parser().parse_args(argv))
    return TrainerSettings(**given)


def settings_error_message(exc: ValidationError) -> str:
    """One line for the first invalid setting: flag and variable, value, what is allowed."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    if exc.title == KafkaSettings.__name__ or (loc and loc[0] == "kafka"):
        return settings_error_line(exc, ENV_PREFIX)
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if not loc:  # a rule across settings
        return msg
    name = loc[0]
    ctx = err.get("ctx") or {}
    allowed = f"allowed: {ctx['expected']}" if "expected" in ctx else msg
    flag = "--" + name.replace("_", "-")
    return f"invalid setting {flag} ({ENV_PREFIX}{name.upper()})={err.get('input')!r}: {allowed}"


def train_config_error_message(exc: ValidationError) -> str:
    """One line for hyper-parameters TrainConfig refuses, named by their flag."""
    err = exc.errors()[0]
    if not err.get("loc"):  # a rule across hyper-parameters: its message names them
        return "invalid settings: " + str(err.get("msg", "invalid")).removeprefix("Value error, ")
    field = str(err["loc"][0])
    name = {v: k for k, v in _TRAIN_CONFIG_NAMES.items()}.get(field, field)
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"invalid setting --{name.replace('_', '-')}={err.get('input')!r}: {msg}"
