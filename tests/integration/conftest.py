from __future__ import annotations

from pathlib import Path

import jsonschema
import numpy as np
import pytest

from deploy.embedded_broker import EmbeddedBroker
from tests.integration.kafka_helpers import copy_model_dir, create_topics, unique
from training.fit import TrainConfig, fit
from worker.checkpoint import publish
from worker.events import event_schema

DIM = 8
FEATURES = [f"s{i}" for i in range(DIM)]


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log") as b:
        yield b


@pytest.fixture
def topics(broker):
    t = {
        "input": unique("features"),
        "output": unique("anomalies"),
        "dlq": unique("dlq"),
        "group": unique("group"),
    }
    create_topics(broker.bootstrap, [t["input"], t["output"], t["dlq"]], partitions=3)
    return t


def normal_rows(n: int, seed: int) -> np.ndarray:
    """Correlated normal traffic: 8 sensors driven by 3 latent factors."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(42).normal(size=(3, DIM))
    return (rng.normal(size=(n, 3)) @ mix + 0.1 * rng.normal(size=(n, DIM))).astype(np.float32)


def train_tiny(seed: int = 0):
    return fit(
        normal_rows(1000, seed),
        FEATURES,
        TrainConfig(max_epochs=25, seed=seed, penalty_weight=0.01),
    )


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Two different trained models (for reloads), published once per session."""
    root = tmp_path_factory.mktemp("models-src")
    first, second = train_tiny(0), train_tiny(1)
    v1 = publish(root, first.model, first.manifest)
    return root, v1, second


@pytest.fixture
def model_dir(trained, tmp_path) -> Path:
    return copy_model_dir(trained[0], tmp_path / "models")


@pytest.fixture(scope="session")
def validate_event():
    validator = jsonschema.Draft202012Validator(event_schema())

    def check(event: dict) -> dict:
        validator.validate(event)
        return event

    return check
