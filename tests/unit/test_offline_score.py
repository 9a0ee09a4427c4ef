import csv
import subprocess
import sys

import numpy as np
import pytest

from training.fit import TrainConfig, fit
from worker.checkpoint import publish
from worker.scoring import load_scorer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    result = fit(x, ["a", "b", "c", "d"], TrainConfig(max_epochs=5, target_fpr=0.05))  # 75 held out
    root = tmp_path_factory.mktemp("models")
    publish(root, result.model, result.manifest)
    return root


def run_score(*args):
    return subprocess.run(
        [sys.executable, "-m", "worker", "score", *map(str, args)], capture_output=True, text=True
    )


def test_scores_every_good_row_in_order_and_reports_bad_rows(model_dir, tmp_path):
    data = tmp_path / "in.csv"
    rows = [
        ["id", "d", "c", "b", "a"],
        ["r1", 1, 2, 3, 4],
        ["r2", "x", 0, 0, 0],
        ["r3", 0, 0, 0, 0],
        ["r4", "", 1, 1, 1],
        ["r5", 9, 9, 9, 9],
    ]
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "scores.csv"
    r = run_score("--model-dir", model_dir, "--data", data, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "row 2: skipped" in r.stderr and "row 4: skipped" in r.stderr
    lines = list(csv.reader(open(out)))
    assert lines[0] == ["id", "row", "score", "p_value", "is_anomaly"]
    assert [ln[:2] for ln in lines[1:]] == [["r1", "1"], ["r3", "3"], ["r5", "5"]]
    # the same numbers the worker's scorer gives, columns put in the model's order
    from worker.checkpoint import read_latest

    scorer = load_scorer(model_dir / read_latest(model_dir))
    want = scorer.score_batch(
        np.array([[4, 3, 2, 1], [0, 0, 0, 0], [9, 9, 9, 9]], dtype=np.float32)
    )
    np.testing.assert_allclose([float(ln[2]) for ln in lines[1:]], want.scores, rtol=1e-6)
    assert [int(ln[4]) for ln in lines[1:]] == want.is_anomaly.astype(int).tolist()


def test_npy_input_and_header_without_id(model_dir, tmp_path):
    data = tmp_path / "in.npy"
    np.save(data, np.zeros((3, 4), dtype=np.float32))
    out = tmp_path / "o.csv"
    r = run_score("--model-dir", model_dir, "--data", data, "--out", out)
    assert r.returncode == 0, r.stderr
    lines = list(csv.reader(open(out)))
    assert lines[0] == ["row", "score", "p_value", "is_anomaly"] and len(lines) == 4


@pytest.mark.parametrize(
    "content,needle",
    [("a,b,c\n1,2,3\n", "missing feature columns"), ("a,b,c,d,e\n1,2,3,4,5\n", "unknown columns")],
)
def test_user_errors_are_one_line(model_dir, tmp_path, content, needle):
    data = tmp_path / "in.csv"
    data.write_text(content)
    r = run_score("--model-dir", model_dir, "--data", data, "--out", tmp_path / "o.csv")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and needle in r.stderr


def test_missing_model_dir_is_one_line(tmp_path):
    data = tmp_path / "in.csv"
    data.write_text("a\n1\n")
    r = run_score("--model-dir", tmp_path / "nowhere", "--data", data, "--out", tmp_path / "o.csv")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
