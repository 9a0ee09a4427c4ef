"""The worker benchmark's measurement: the timed window of a run, and its rounds (which
loop runs when, and which round stands for them)."""

from tests.bench._worker_measure import _timed_window, median_run, rounds_order
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


def test_the_window_runs_from_the_second_commit_to_the_last_before_the_drain():
    # (t, committed): a slow first commit holding 2 500 records, then 1 000 a second,
    # then the drain commits the last 1 500 at once
    total = [(0.0, 0), (1.0, 0), (2.0, 2500), (2.5, 2500), (3.0, 3500), (3.5, 3500),
             (4.0, 4500), (4.5, 4500), (5.0, 5500), (5.1, 7000)]  # fmt: skip
    first, last = _timed_window(total, 7000)
    assert (first, last) == ((3.0, 3500), (5.0, 5500))
    assert (last[1] - first[1]) / (last[0] - first[0]) == 1000


def test_with_few_commits_the_window_runs_from_the_first_to_the_final_one():
    total = [(0.0, 0), (1.0, 500), (1.5, 700), (2.0, 1000)]
    assert _timed_window(total, 1000) == ((1.0, 500), (2.0, 1000))
    assert _timed_window([(0.0, 0), (1.0, 0)], 1000) == (None, None)
    assert _timed_window([(0.0, 0), (1.0, 1000)], 1000) == ((1.0, 1000), (1.0, 1000))
