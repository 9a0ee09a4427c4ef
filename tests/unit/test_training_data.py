"""Data loading in every format, and the metrics against scikit-learn's definitions."""

from __future__ import annotations

import numpy as np
import pytest

from training import metrics
from training.fit import DataError
from worker.datafile import load_dataset


def test_csv_with_label_and_id_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,x,y,label\nr1,1,2,normal\nr2,3,4.5,anomaly\nr3,5,6,0\n")
    data = load_dataset(path)
    assert data.feature_names == ["x", "y"]
    assert data.x.dtype == np.float32 and data.x.tolist() == [[1, 2], [3, 4.5], [5, 6]]
    assert data.labels.tolist() == [0, 1, 0]
    assert data.ids == ["r1", "r2", "r3"]
    assert data.normal_rows.tolist() == [[1, 2], [5, 6]]


def test_npy_and_npz(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "d.npy", x)
    data = load_dataset(tmp_path / "d.npy")
    assert data.feature_names == ["f0", "f1", "f2"] and data.labels is None
    np.savez(tmp_path / "d.npz", X=x, y=np.array([0, 1, 0, 0]))
    data = load_dataset(tmp_path / "d.npz")
    assert data.x.tolist() == x.tolist() and data.labels.tolist() == [0, 1, 0, 0]


def test_object_arrays_are_refused_not_unpickled(tmp_path):
    np.save(tmp_path / "d.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a plain numeric array"):
        load_dataset(tmp_path / "d.npy")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"a": [1.0, 2.0], "b": [3, 4], "label": [False, True]})
    pq.write_table(table, tmp_path / "d.parquet")
    data = load_dataset(tmp_path / "d.parquet")
    assert data.feature_names == ["a", "b"] and data.labels.tolist() == [0, 1]
    pq.write_table(pa.table({"a": [1.0, None]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match="1 row"):
        load_dataset(tmp_path / "n.parquet")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("a,b\n", "no data rows"),
        ("a,b\n1,2,3\n", "row 1 (line 2) has 3 fields"),
        ("a,a\n1,2\n", "'a' appears more than once"),
        ("a,label\n1,2\n", "label column 'label' row 1: '2' is not a label"),
        ("a,b\n1,inf\n", "1 row(s) have missing, NaN or Inf values, first at row 1 column 'b'"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_metrics_match_scikit_learn_with_ties():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, size=60)
        y[:2] = [0, 1]
        s = rng.integers(0, 8, size=60).astype(float)  # many ties
        assert metrics.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
        assert metrics.average_precision(y, s) == pytest.approx(
            sk.average_precision_score(y, s), abs=1e-12
        )


def test_metrics_at_threshold_and_one_class():
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.5, 0.9])
    m = metrics.evaluate(y, s, threshold=0.5)
    assert (m["precision"], m["recall"], m["fpr"]) == (2 / 3, 1.0, 0.5)
    assert metrics.roc_auc(np.zeros(3), np.arange(3.0)) is None
