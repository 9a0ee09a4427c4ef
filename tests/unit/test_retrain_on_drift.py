"""Retraining on drift (training/cli.py RetrainPlan, training/from_kafka.py
drift_openings): when the periodic trainer retrains, which incidents count, and the
flags that turn it on."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest
from pydantic import ValidationError

from training.cli import RetrainPlan
from training.from_kafka import drift_openings
from training.settings import parse_cli


def plan(every=3600.0, delay=60.0, min_interval=600.0) -> RetrainPlan:
    return RetrainPlan(every, delay, min_interval, now=0.0)


def test_the_first_cycle_is_at_once_then_on_the_timer():
    p = plan()
    assert p.due(0.0) == ("timer", None)
    p.done("timer", 10.0, ok=True)
    assert p.due(3609.0) is None and p.due(3610.0) == ("timer", None)
    assert p.next_at(10.0) == 3600.0


def test_a_drift_retrains_after_the_delay_on_the_records_since_it_opened():
    p = plan()
    p.done("timer", 0.0, ok=True)
    p.drift(started_at_ms=1_000_000, now=100.0)
    assert p.due(159.0) is None
    assert p.next_at(100.0) == 60.0
    assert p.due(160.0) == ("drift", 1_000_000)
    p.done("drift", 170.0, ok=True)
    assert p.due(171.0) is None
    assert p.timer_at == 170.0 + 3600.0  # a drift retrain restarts the timer


def test_at_most_one_drift_retrain_per_interval():
    p = plan()
    p.done("timer", 0.0, ok=True)
    p.drift(1000, now=100.0)
    p.done("drift", 160.0, ok=True)
    p.drift(2000, now=200.0)  # opens again soon after: waits for the interval
    assert p.due(700.0) is None
    assert p.due(760.0) == ("drift", 2000)


def test_a_later_opening_moves_the_snapshot_start_and_a_failed_retrain_is_retried():
    p = plan()
    p.done("timer", 0.0, ok=True)
    p.drift(1000, now=100.0)
    p.drift(5000, now=120.0)
    assert p.due(160.0) == ("drift", 5000)
    p.done("drift", 165.0, ok=False)  # e.g. too few rows since the shift
    assert p.due(200.0) is None
    assert p.due(225.0) == ("drift", 5000)


def record(doc) -> SimpleNamespace:
    return SimpleNamespace(value=doc if isinstance(doc, bytes) else orjson.dumps(doc))


def test_only_drift_openings_on_the_input_topic_count():
    base = {"kind": "drift", "status": "open", "topic": "features", "started_at_ms": 7}
    records = [
        record(base),
        record({**base, "status": "resolved"}),
        record({**base, "topic": "other"}),
        record({**base, "kind": "anomaly"}),
        record({**base, "started_at_ms": "7"}),
        record({**base, "started_at_ms": True}),
        record(b"not json"),
        record(b"[1, 2]"),
        SimpleNamespace(value=None),
        record({**base, "started_at_ms": 9}),
    ]
    assert drift_openings(records, "features") == [7, 9]


def test_the_incident_topic_needs_the_periodic_mode():
    s = parse_cli(["--from-kafka", "--every-seconds", "60", "--incident-topic", "incidents"])
    assert (
        s.retrain_on_drift and s.drift_delay_seconds == 60 and s.drift_min_interval_seconds == 600
    )
    assert not parse_cli(["--from-kafka"]).retrain_on_drift
    with pytest.raises(ValidationError, match="needs --every-seconds"):
        parse_cli(["--from-kafka", "--incident-topic", "incidents"])
    with pytest.raises(ValidationError, match="drift_delay_seconds"):
        parse_cli(["--from-kafka", "--every-seconds", "60", "--drift-delay-seconds", "-1"])
