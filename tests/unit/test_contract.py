"""docs/contract.md stays true: every name the code can emit or read is documented in
its section (error codes, refusal reasons, manifest fields, settings, metrics)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from training.settings import TrainerSettings
from worker import checkpoint, codec, shadow
from worker.checkpoint import CheckpointError, Manifest
from worker.metrics import WorkerMetrics
from worker.settings import KafkaSettings, WorkerSettings

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "contract.md"


def section(title: str) -> str:
    """The text of one `##`/`###` section, up to the next heading of the same or higher level."""
    text = CONTRACT.read_text()
    match = re.search(rf"^(#+) {re.escape(title)}\n", text, flags=re.M)
    assert match, f"docs/contract.md has no section {title!r}"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    return rest[: end.start()] if end else rest


def test_every_dlq_code_is_documented():
    text = section("Error codes")
    assert [c for c in codec.REASONS if f"`{c}`" not in text] == []


def test_every_refusal_reason_is_documented():
    reasons = [
        name
        for name, obj in vars(checkpoint).items()
        if isinstance(obj, type) and issubclass(obj, CheckpointError) and obj is not CheckpointError
    ]
    assert len(reasons) >= 7
    text = section("Refusal reasons")
    assert [r for r in reasons if f"`{r}`" not in text] == []


def test_every_shadow_refusal_reason_is_documented():
    text = section("Refusal reasons")
    assert [r for r in shadow.REFUSAL_REASONS if f"`{r}`" not in text] == []


def test_every_manifest_field_is_documented():
    text = section("Manifest")
    assert [f for f in Manifest.model_fields if f"`{f}`" not in text] == []


@pytest.mark.parametrize(
    "settings, title",
    [(WorkerSettings, "Worker"), (KafkaSettings, "Kafka connection (worker and trainer)")],
)
def test_every_setting_is_documented(settings, title):
    prefix = settings.model_config["env_prefix"]
    text = section(title)
    names = [f"{prefix}{name}".upper() for name in settings.model_fields if name != "kafka"]
    assert [n for n in names if f"`{n}`" not in text] == []


def test_the_trainer_settings_point_at_the_help():
    assert TrainerSettings.model_config["env_prefix"] in section("Trainer")


def test_every_metric_is_documented():
    text = section("Health and metrics")
    names = {m.name for m in WorkerMetrics().registry.collect()}
    assert names and [n for n in sorted(names) if f"`{n}" not in text] == []
