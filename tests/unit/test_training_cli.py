"""python -m training end to end: publication, report, determinism, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.cli import main
from training.config import TrainConfig
from training.settings import REPORTS_DIRNAME, parse_cli
from worker.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, read_latest
from worker.scoring import load_scorer

REPO = Path(__file__).resolve().parents[2]
# the knn default calibrates on every normal row: 138 of them support ≥ 1/139
FAST = ["--epochs", "8", "--seed", "3", "--target-fpr", "0.05"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train faster on one thread, and don't stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_csv(path: Path, x: np.ndarray, labels: np.ndarray | None = None, header=None) -> Path:
    names = header or [f"s{i}" for i in range(x.shape[1])]
    lines = ["id," + ",".join(names) + (",label" if labels is not None else "")]
    for i, row in enumerate(x):
        cells = [f"row{i}", *(f"{v:.6g}" for v in row)]
        if labels is not None:
            cells.append(str(int(labels[i])))
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def labelled_csv(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 4))
    x[:, 1] = x[:, 0] + 0.1 * rng.normal(size=150)
    labels = np.zeros(150, dtype=int)
    labels[-12:] = 1
    x[-12:] += rng.normal(scale=5.0, size=(12, 4))
    return write_csv(tmp_path / "train.csv", x, labels)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_subprocess_publishes_a_verified_version_and_a_report(tmp_path, labelled_csv):
    out = tmp_path / "models"
    proc = run_cli("--data", str(labelled_csv), "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    version = proc.stdout.strip().splitlines()[-1]
    assert read_latest(out) == version
    assert sorted(p.name for p in (out / version).iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]
    scorer = load_scorer(out / version)
    assert scorer.feature_names == ["s0", "s1", "s2", "s3"]
    assert scorer.manifest.metrics["anomaly_rows_excluded"] == 12
    report_dir = out / REPORTS_DIRNAME / version
    report = json.loads((report_dir / "report.json").read_text())
    assert report["version"] == version
    assert report["threshold"] == scorer.threshold
    assert report["threshold_method"] == "empirical" and report["tail"] is None  # 34 held out
    evaluation = report["evaluation"]
    assert evaluation["rows"] == 150 and evaluation["anomalies"] == 12
    for key in ("roc_auc", "average_precision", "precision", "recall", "fpr"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert evaluation["roc_auc"] > 0.8  # the anomalies are far off the normal rows
    assert {"loss.png", "scores.png", "roc.png"} <= {p.name for p in report_dir.iterdir()}
    assert "Traceback" not in proc.stderr


def test_subprocess_user_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3,oops\n")
    proc = run_cli("--data", str(bad), "--out", str(tmp_path / "models"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {bad}: column 'b' row 2: 'oops' is not a number"]
    assert proc.stdout == ""
    assert not (tmp_path / "models").exists()


def _error_cases(tmp: Path, good: Path) -> dict[str, list[str]]:
    nan_rows = tmp / "nan.csv"
    nan_rows.write_text("a,b\n" + "1,2\n" * 12 + "nan,1\n3,\n")
    few = tmp / "few.csv"
    few.write_text("a,b\n1,2\n3,4\n")
    text = tmp / "text.csv"
    text.write_text("a,b\n1,2\nx,4\n")
    blocker = tmp / "a-file"
    blocker.write_text("")
    return {
        "missing file": ["--data", str(tmp / "nope.csv")],
        "unknown format": ["--data", str(blocker)],
        "non-numeric column": ["--data", str(text)],
        "nan rows": ["--data", str(nan_rows)],
        "too few rows": ["--data", str(few)],
        "unknown label column": ["--data", str(good), "--label-column", "klass"],
        "out under a file": ["--data", str(good), "--out", str(blocker / "models")],
        "invalid fpr": ["--data", str(good), "--target-fpr", "1.5"],
        "target below the data": ["--data", str(good), "--target-fpr", "0.00001"],
        "invalid penalty weight": ["--data", str(good), "--penalty-weight", "-1"],
        "invalid mode": ["--data", str(good), "--penalty-mode", "fastest"],
        "unknown flag": ["--data", str(good), "--learning-rate", "3"],
        "no data": [],
        "bad input topic": ["--from-kafka", "--input-topic", "sensors+raw"],
        "bad model topic": ["--data", str(good), "--model-topic", "models v2"],
        "bad incident topic": ["--from-kafka", "--every-seconds", "60", "--incident-topic", "é"],
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "unknown format",
        "non-numeric column",
        "nan rows",
        "too few rows",
        "unknown label column",
        "out under a file",
        "invalid fpr",
        "target below the data",
        "invalid penalty weight",
        "invalid mode",
        "unknown flag",
        "no data",
        "bad input topic",
        "bad model topic",
        "bad incident topic",
    ],
)
def test_user_error_is_one_line_and_publishes_nothing(tmp_path, labelled_csv, capsys, case):
    args = _error_cases(tmp_path, labelled_csv)[case]
    out = tmp_path / "models"
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    code = main([*FAST, *args])  # the case's own flags last: they win
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert read_latest(out) is None


def test_error_messages_name_the_problem(tmp_path, labelled_csv, capsys):
    cases = _error_cases(tmp_path, labelled_csv)
    expected = {
        "nan rows": "2 row(s) have missing, NaN or Inf values, first at row 13",
        "too few rows": "need at least 10 normal rows",
        "unknown label column": "label column 'klass' is not in the header",
        "invalid fpr": "--target-fpr (TRAINER_TARGET_FPR)='1.5'",
        # 138 normal rows, all calibration rows for the knn default: too few for a tail,
        # the conformal limit is 1/139
        "target below the data": "--target-fpr 1e-05 is below what 138 normal calibration "
        "rows support (too few of them to fit a tail; a threshold cannot be placed beyond "
        "the largest): the lowest is 0.00719",
        "out under a file": "--out",
        "bad input topic": "invalid setting --input-topic (TRAINER_INPUT_TOPIC)='sensors+raw': "
        "'sensors+raw' is not a Kafka topic name",
        "bad model topic": "--model-topic (TRAINER_MODEL_TOPIC)='models v2'",
        "bad incident topic": "--incident-topic (TRAINER_INCIDENT_TOPIC)='é'",
    }
    for case, fragment in expected.items():
        main([*FAST, *cases[case]])
        assert fragment in capsys.readouterr().err, case


def published_manifest(out: Path) -> dict:
    return json.loads((out / read_latest(out) / MANIFEST_FILE).read_text())


def test_same_seed_same_model_and_training_lowers_the_loss(tmp_path, labelled_csv, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--data", str(labelled_csv), "--out", str(a), *FAST]) == 0
    assert main(["--data", str(labelled_csv), "--out", str(b), *FAST]) == 0
    ma, mb = published_manifest(a), published_manifest(b)
    assert ma["weights_sha256"] == mb["weights_sha256"]
    assert ma["golden"] == mb["golden"]
    assert ma["threshold"] == mb["threshold"]
    report = json.loads((a / REPORTS_DIRNAME / ma["version"] / "report.json").read_text())
    history = report["history"]
    assert history["val_loss"][history["best_epoch"]] < history["val_loss"][0]
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_report_dir_flag_and_pruned_reports(tmp_path, labelled_csv, capsys):
    out, reports = tmp_path / "models", tmp_path / "my-report"
    assert (
        main(["--data", str(labelled_csv), "--out", str(out), "--report-dir", str(reports), *FAST])
        == 0
    )
    assert (reports / "report.json").is_file()
    assert not (out / REPORTS_DIRNAME).exists()
    capsys.readouterr()
    versions = []
    for _ in range(2):
        assert main(["--data", str(labelled_csv), "--out", str(out), "--keep", "1", *FAST]) == 0
        versions.append(capsys.readouterr().out.strip())
    assert sorted(p.name for p in (out / REPORTS_DIRNAME).iterdir()) == versions[-1:]


def test_help_shows_the_real_defaults_and_plain_metavars():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "--target-fpr FPR false-positive rate the threshold targets (default: 0.01)" in text
    assert "(default: null)" not in text and ",null}" not in text
    assert "TRAINER_TARGET_FPR" in text  # the rule for every flag's variable


def test_flags_override_the_environment_and_unset_flags_keep_it(monkeypatch):
    monkeypatch.setenv("TRAINER_TARGET_FPR", "0.05")
    monkeypatch.setenv("TRAINER_HIDDEN", "32,16")
    monkeypatch.setenv("TRAINER_DATA", "rows.csv")
    from_env = parse_cli([])
    assert from_env.target_fpr == 0.05 and from_env.hidden == (32, 16)
    assert from_env.train_config().hidden == (32, 16)
    given = parse_cli(["--target-fpr", "0.02", "--hidden", "128,64", "--epochs", "7"])
    assert given.target_fpr == 0.02 and given.hidden == (128, 64)
    assert given.train_config().max_epochs == 7 and given.data == Path("rows.csv")


def test_unset_hyper_parameters_are_train_configs_defaults(tmp_path):
    assert parse_cli(["--data", str(tmp_path / "x.csv")]).train_config() == TrainConfig()


def test_score_flags_reach_the_checkpoint(tmp_path, labelled_csv, capsys):
    knn, mae = tmp_path / "knn", tmp_path / "mae"
    flags = ["--data", str(labelled_csv), *FAST]
    assert main([*flags, "--out", str(knn), "--neighbours", "3", "--reference-rows", "50"]) == 0
    assert main([*flags, "--out", str(mae), "--score", "mae"]) == 0
    m = published_manifest(knn)
    assert (m["score"], m["neighbours"], m["architecture"]["reference_rows"]) == ("knn", 3, 50)
    m = published_manifest(mae)
    assert (m["score"], m["neighbours"], m["architecture"]["reference_rows"]) == ("mae", None, 0)
    capsys.readouterr()
    assert main([*flags, "--out", str(tmp_path / "bad"), "--reference-rows", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: invalid settings: --reference-rows (5) must exceed --neighbours (5)"]
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
