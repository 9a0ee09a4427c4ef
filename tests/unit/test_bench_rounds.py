"""The benchmark's rounds: which loop runs when, and which round stands for them."""

from tests.bench._worker_measure import median_run, rounds_order
from tests.bench.worker import _rounds_ratio_note


def test_rounds_take_turns_and_reverse_every_other_round():
    order = list(rounds_order(["worker", "worker+env", "passthrough"], 3))
    assert order == [
        (0, "worker"), (0, "worker+env"), (0, "passthrough"),
        (1, "passthrough"), (1, "worker+env"), (1, "worker"),
        (2, "worker"), (2, "worker+env"), (2, "passthrough"),
    ]  # fmt: skip


def test_median_run_keeps_the_median_rounds_figures_and_every_rate_in_order():
    runs = [
        {"records_per_s": 30.0, "cpu_us_per_record": 3},
        {"records_per_s": 10.0, "cpu_us_per_record": 1},
        {"records_per_s": 20.0, "cpu_us_per_record": 2},
    ]
    r = median_run(runs)
    assert (r["records_per_s"], r["cpu_us_per_record"]) == (20.0, 2)
    assert r["rounds"] == [30.0, 10.0, 20.0]
    assert "rounds" not in runs[2]  # the rounds themselves are left as they were
    assert median_run(runs[:2])["records_per_s"] == 10.0  # even: the lower middle


def test_the_note_pairs_each_round_with_the_passthrough_of_the_same_round():
    w = {"rounds": [90.0, 80.0, 70.0]}
    pt = {"rounds": [100.0, 100.0, 140.0]}
    assert (
        _rounds_ratio_note(w, pt)
        == "; medians of 3 rounds taking turns, per round 0.90, 0.80, 0.50"
    )
    assert _rounds_ratio_note({"rounds": [1.0]}, {"rounds": [2.0]}) == ""
    assert _rounds_ratio_note({}, {}) == ""
