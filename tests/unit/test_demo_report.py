"""The demo's episode report: which incidents and episodes belong to its first act."""

from __future__ import annotations

from deploy.demo_report import SAMPLE_MS, T_START_MS, before, episode_report
from deploy.sensor_stream import Episode


def message(seq: int, started: int, updated: int, key: str = "machine-0") -> dict:
    at = lambda i: T_START_MS + i * SAMPLE_MS  # noqa: E731  (row i's event time)
    return {
        "key": key,
        "sequence": seq,
        "started_at_ms": at(started),
        "updated_at_ms": at(updated),
        "ended_at_ms": None,
    }


def test_an_incident_belongs_to_the_act_whose_row_opened_it():
    shift = T_START_MS + 100 * SAMPLE_MS  # the shift at row 100
    incidents = {
        "early": [message(0, 10, 16), message(1, 10, 30)],  # opened at row 16
        # its window reached back before the shift, but row 104 opened it
        "straddles": [message(1, 98, 120), message(0, 98, 104)],
        "late": [message(0, 150, 155)],
    }
    episodes = {"machine-0": [Episode("spike", 0, 10, 20), Episode("spike", 0, 98, 20)]}
    kept, eps = before(incidents, episodes, shift)
    assert sorted(kept) == ["early"]
    assert eps == {"machine-0": [Episode("spike", 0, 10, 20), Episode("spike", 0, 98, 20)]}
    report = episode_report(kept, eps)
    assert (report["episodes"], report["detected"], report["false_incidents"]) == (2, 1, 0)


def test_episodes_from_the_shift_on_are_second_act():
    shift = T_START_MS + 100 * SAMPLE_MS
    episodes = {"machine-1": [Episode("drift", 2, 99, 5), Episode("drift", 2, 100, 5)]}
    assert before({}, episodes, shift)[1] == {"machine-1": [Episode("drift", 2, 99, 5)]}
