"""The trainer's settings: environment (TRAINER_*, KAFKA_*) and CLI flags, one class.

Hyper-parameters left unset fall through to `training.fit.TrainConfig`'s defaults,
so the defaults live in one place. Tests build the settings from keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, CliSuppress, SettingsConfigDict

from training.fit import TrainConfig
from training.penalty import PenaltyMode
from worker.model import Activation
from worker.settings import KafkaSettings, settings_error_line

ENV_PREFIX = "TRAINER_"
PROG = "python -m training"
REPORTS_DIRNAME = ".reports"  # dot-prefixed: never mistaken for a checkpoint version

# Settings fields whose TrainConfig name differs.
_TRAIN_CONFIG_NAMES = {"epochs": "max_epochs", "projections": "n_projections"}


class TrainerSettings(BaseSettings):
    """python -m training --data FILE --out MODEL_DIR [options]"""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        cli_prog_name=PROG,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_exit_on_error=False,
    )

    # Kafka connection (KAFKA_* only, shared with the worker); used by --from-kafka.
    kafka: CliSuppress[KafkaSettings] = Field(default_factory=KafkaSettings)

    data: Path | None = Field(
        default=None,
        description="training data: .csv (header of feature names), .npy, .npz or .parquet",
    )
    out: Path = Field(
        default=Path("./models"), description="model directory to publish into (WORKER_MODEL_DIR)"
    )
    keep: int = Field(
        default=5, ge=1, description="published versions to keep; older ones are pruned"
    )
    report_dir: Path | None = Field(
        default=None,
        description=f"where report.json and plots go (default: OUT/{REPORTS_DIRNAME}/VERSION)",
    )
    label_column: str | None = Field(
        default=None,
        description="column with 0/1 labels, 1 = anomaly (default: 'label' if present)",
    )
    id_column: str | None = Field(
        default=None, description="column with row ids (default: 'id' if present)"
    )

    # Hyper-parameters: unset means TrainConfig's default.
    target_fpr: float | None = Field(
        default=None, gt=0, lt=1, description="false-positive rate the threshold targets"
    )
    penalty_weight: float | Literal["auto"] | None = Field(
        default=None, description="λ of the contractive penalty, a number ≥ 0 or 'auto'"
    )
    penalty_mode: PenaltyMode | None = Field(default=None, description="closed | exact | estimate")
    projections: int | None = Field(
        default=None, gt=0, description="random projections per row (estimate mode)"
    )
    seed: int | None = Field(
        default=None, description="random seed; same seed, same data → same model"
    )
    epochs: int | None = Field(default=None, gt=0, description="maximum training epochs")
    patience: int | None = Field(
        default=None, gt=0, description="early-stopping patience in epochs"
    )
    batch_size: int | None = Field(default=None, gt=0, description="training batch size")
    lr: float | None = Field(default=None, gt=0, description="Adam learning rate")
    code_dim: int | None = Field(
        default=None, gt=0, description="code width (default: sized by the input)"
    )
    hidden: tuple[int, ...] | None = Field(
        default=None, description="encoder hidden widths, e.g. 128,64"
    )
    activation: Activation | None = Field(default=None, description="encoder activation")
    scaler: Literal["standard", "robust"] | None = Field(default=None, description="input scaler")
    torch_threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description="CPU threads for training (1 is fastest for small models)",
    )

    # Retraining from the input topic, once or periodically.
    from_kafka: bool = Field(
        default=False,
        description="train on a bounded snapshot of the input topic; publish only if not worse than the live model",
    )
    input_topic: str = Field(
        default="features", description="--from-kafka: the topic to read (WORKER_INPUT_TOPIC)"
    )
    max_records: int | None = Field(
        default=None, gt=0, description="--from-kafka: stop after N records"
    )
    max_seconds: float | None = Field(
        default=None, gt=0, description="--from-kafka: stop after N seconds"
    )
    every_seconds: float | None = Field(
        default=None, gt=0, description="periodic mode: retrain every N seconds"
    )

    @field_validator("penalty_weight", mode="before")
    @classmethod
    def _penalty_weight(cls, v: object) -> object:
        if v is None or isinstance(v, int | float):
            weight = v
        elif isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        else:
            try:
                weight = float(str(v))
            except ValueError:
                raise ValueError("allowed: a number ≥ 0 or 'auto'") from None
        if weight is not None and not (weight >= 0 and weight != float("inf")):
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
        return self

    def train_config(self) -> TrainConfig:
        """The hyper-parameters given, on top of TrainConfig's defaults."""
        given = {
            _TRAIN_CONFIG_NAMES.get(name, name): getattr(self, name)
            for name in (
                "target_fpr",
                "penalty_weight",
                "penalty_mode",
                "projections",
                "seed",
                "epochs",
                "patience",
                "batch_size",
                "lr",
                "code_dim",
                "hidden",
                "activation",
                "scaler",
            )  # fmt: skip
            if getattr(self, name) is not None
        }
        return TrainConfig(**given)

    def report_dir_for(self, version: str) -> Path:
        return (
            self.report_dir if self.report_dir is not None else self.out / REPORTS_DIRNAME / version
        )


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
    field = str(err["loc"][0]) if err.get("loc") else "?"
    name = {v: k for k, v in _TRAIN_CONFIG_NAMES.items()}.get(field, field)
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"invalid setting --{name.replace('_', '-')}={err.get('input')!r}: {msg}"
