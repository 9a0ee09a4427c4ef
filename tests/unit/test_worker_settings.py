"""Worker settings that Kafka would refuse are refused at start-up, in one line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.settings import WorkerSettings, settings_error_line

TOPIC_SETTINGS = [
    "WORKER_INPUT_TOPIC",
    "WORKER_OUTPUT_TOPIC",
    "WORKER_DLQ_TOPIC",
    "WORKER_INCIDENT_TOPIC",
    "WORKER_INCIDENT_STATE_TOPIC",
    "WORKER_MODEL_TOPIC",
]


@pytest.mark.parametrize("var", TOPIC_SETTINGS)
@pytest.mark.parametrize("name", ["json-worker+env-events", "a b", "é", "x" * 250, ".", ".."])
def test_an_illegal_topic_name_is_one_clear_error(monkeypatch, var, name):
    monkeypatch.setenv(var, name)
    with pytest.raises(ValidationError) as err:
        WorkerSettings()
    line = settings_error_line(err.value, "WORKER_")
    assert line.startswith(f"invalid setting {var}=") and "is not a Kafka topic name" in line


@pytest.mark.parametrize("var", TOPIC_SETTINGS)
def test_legal_topic_names_pass(monkeypatch, var):
    monkeypatch.setenv(var, "Sensors_v2.features-" + "x" * 200)
    assert getattr(WorkerSettings(), var.removeprefix("WORKER_").lower()).startswith("Sensors_v2")


@pytest.mark.parametrize("off", ["none", "None", " NONE "])
def test_the_off_switches_stay_valid(monkeypatch, off):
    monkeypatch.setenv("WORKER_INCIDENT_TOPIC", off)
    monkeypatch.setenv("WORKER_INCIDENT_STATE_TOPIC", off)
    monkeypatch.setenv("WORKER_MODEL_TOPIC", "")
    s = WorkerSettings()
    assert not s.incidents_on and not s.incident_state_on and s.model_topic == ""


@pytest.mark.parametrize("off", ["none", "None", " NONE "])
def test_the_trainer_reads_the_incident_topic_s_off_switch_as_the_worker_does(off):
    from training.settings import TrainerSettings

    s = TrainerSettings(data="x.csv", incident_topic=off)
    assert s.incident_topic == WorkerSettings(incident_topic=off).incident_topic == "none"
    assert not s.retrain_on_drift


def test_the_state_topic_alone_off_keeps_incidents_in_memory(monkeypatch):
    monkeypatch.setenv("WORKER_INCIDENT_STATE_TOPIC", "None")
    s = WorkerSettings()
    assert s.incidents_on and not s.incident_state_on


@pytest.mark.parametrize("value", ["1", "-1", "x"])
def test_a_stuck_records_setting_that_cannot_repeat_is_refused(monkeypatch, value):
    monkeypatch.setenv("WORKER_STUCK_RECORDS", value)
    with pytest.raises(ValidationError) as err:
        WorkerSettings()
    assert settings_error_line(err.value, "WORKER_").startswith(
        "invalid setting WORKER_STUCK_RECORDS="
    )


@pytest.mark.parametrize("value", ["0", "2", "5"])
def test_stuck_records_off_or_at_least_two(monkeypatch, value):
    monkeypatch.setenv("WORKER_STUCK_RECORDS", value)
    assert WorkerSettings().stuck_records == int(value)
