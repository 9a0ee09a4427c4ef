"""Reading feature data from a file: CSV, .npy, .npz or Parquet.

Used by the trainer (training) and by offline scoring (python -m worker score).
Every problem a user can cause raises `DataError` with one line that
names the file and, where it applies, the column and the row. Rows are numbered
from 1 in file order, counting data rows only (a CSV's header is not a row).

Non-finite values (NaN, ±Inf, empty CSV cells, Parquet nulls) are refused, not
dropped: a model trained on silently filtered data hides a broken pipeline.
Offline scoring asks for `bad_rows="keep"` instead: unreadable cells become NaN
and the caller reports each bad row by number and leaves it out.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np


class DataError(ValueError):
    """Data a user supplied that cannot be used; the message says why, in one line."""


# training.fit.fit refuses fewer; checked here first so the message can say why.
MIN_TRAIN_ROWS = 10
DEFAULT_LABEL_COLUMN = "label"
DEFAULT_ID_COLUMN = "id"

_NORMAL = {"0", "0.0", "false", "normal", "inlier", "no"}
_ANOMALY = {"1", "1.0", "true", "anomaly", "outlier", "yes"}
_LABEL_VALUES_HELP = "allowed: 0/1, true/false, normal/anomaly"


@dataclass(frozen=True)
class Dataset:
    """Feature rows with optional labels (1 = anomaly) and ids, in file order."""

    x: np.ndarray  # float32 [N, D]
    feature_names: list[str]
    labels: np.ndarray | None = None  # int8 [N], 0 normal / 1 anomaly
    ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.x)

    @property
    def normal_rows(self) -> np.ndarray:
        """The rows to fit on: all rows when unlabelled, else those labelled 0."""
        return self.x if self.labels is None else self.x[self.labels == 0]

    def require_training_rows(self, source: str | Path) -> None:
        n = len(self.normal_rows)
        if n < MIN_TRAIN_ROWS:
            why = (
                f" ({len(self) - n} rows labelled anomaly are left out)"
                if self.labels is not None
                else ""
            )
            raise DataError(
                f"{source}: need at least {MIN_TRAIN_ROWS} normal rows to train, got {n}{why}"
            )


def load_dataset(
    path: str | Path,
    label_column: str | None = None,
    id_column: str | None = None,
    bad_rows: Literal["refuse", "keep"] = "refuse",
) -> Dataset:
    """Load a data file by its extension.

    `label_column`/`id_column` name columns that are not features (CSV, Parquet);
    when None, a column named ``label``/``id`` is used if present. A named column
    that is absent is an error.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    loaders = {
        ".csv": _load_csv,
        ".npy": _load_npy,
        ".npz": _load_npz,
        ".parquet": _load_parquet,
        ".pq": _load_parquet,
    }
    loader = loaders.get(suffix)
    if loader is None:
        allowed = ", ".join(sorted(loaders))
        raise DataError(
            f"{path}: unknown data format {suffix or '(no extension)'!r}; allowed: {allowed}"
        )
    try:
        data = loader(path, label_column, id_column, bad_rows == "refuse")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    _check_rows(path, data, bad_rows == "refuse")
    return data


def _check_rows(path: Path, data: Dataset, refuse_non_finite: bool = True) -> None:
    if data.x.shape[1] == 0:
        raise DataError(f"{path}: no feature columns")
    if len(data.x) == 0:
        raise DataError(f"{path}: no data rows")
    bad = ~np.isfinite(data.x).all(axis=1)
    if bad.any() and refuse_non_finite:
        first = int(np.argmax(bad))
        col = data.feature_names[int(np.argmax(~np.isfinite(data.x[first])))]
        raise DataError(
            f"{path}: {int(bad.sum())} row(s) have missing, NaN or Inf values, "
            f"first at row {first + 1} column {col!r}; clean or drop them before training"
        )
    names = data.feature_names
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path}: feature column {dup!r} appears more than once")
    if any(not n.strip() for n in names):
        raise DataError(f"{path}: a feature column has an empty name")


def _pick_column(
    path: Path, header: list[str], named: str | None, default: str, what: str
) -> str | None:
    if named is None:
        return default if default in header else None
    if named not in header:
        shown = ", ".join(header[:12]) + (", …" if len(header) > 12 else "")
        raise DataError(f"{path}: {what} column {named!r} is not in the header (columns: {shown})")
    return named


def parse_labels(path: Path, column: str, values: list) -> np.ndarray:
    """0/1 labels from numbers, booleans or words; anything else is a DataError."""
    out = np.empty(len(values), dtype=np.int8)
    for i, v in enumerate(values):
        key = str(v).strip().lower()
        if key in _NORMAL:
            out[i] = 0
        elif key in _ANOMALY:
            out[i] = 1
        else:
            raise DataError(
                f"{path}: label column {column!r} row {i + 1}: {v!r} is not a label ({_LABEL_VALUES_HELP})"
            )
    return out


def _parse_numeric_column(
    path: Path, name: str, cells: list[str], strict: bool = True
) -> np.ndarray:
    """Strings to float64; empty cells become NaN (refused later with the row count).

    Not strict: a cell that is not a number becomes NaN too, for the caller to report.
    """
    arr = np.asarray([c if c.strip() else "nan" for c in cells], dtype=str)
    try:
        return arr.astype(np.float64)
    except ValueError:
        pass
    if not strict:
        return np.asarray([_float_or_nan(c) for c in cells], dtype=np.float64)
    for i, cell in enumerate(cells):
        try:
            float(cell) if cell.strip() else None
        except ValueError:
            raise DataError(
                f"{path}: column {name!r} row {i + 1}: {cell!r} is not a number"
            ) from None
    raise AssertionError("unreachable: numpy refused a column that float() accepts")


def _float_or_nan(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return float("nan")


def _load_csv(
    path: Path, label_column: str | None, id_column: str | None, strict: bool = True
) -> Dataset:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    while rows and not any(cell.strip() for cell in rows[-1]):
        rows.pop()  # trailing blank lines
    if not rows:
        raise DataError(f"{path}: empty file (expected a header of feature names)")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(
                f"{path}: row {i + 1} (line {i + 2}) has {len(row)} fields, the header has {len(header)}"
            )
    label = _pick_column(path, header, label_column, DEFAULT_LABEL_COLUMN, "label")
    ident = _pick_column(path, header, id_column, DEFAULT_ID_COLUMN, "id")
    columns = list(zip(*body, strict=True)) if body else [()] * len(header)
    features = [(j, n) for j, n in enumerate(header) if n not in (label, ident)]
    x = np.empty((len(body), len(features)), dtype=np.float32)
    for k, (j, name) in enumerate(features):
        x[:, k] = _parse_numeric_column(path, name, list(columns[j]), strict)
    return Dataset(
        x=x,
        feature_names=[n for _, n in features],
        labels=parse_labels(path, label, list(columns[header.index(label)])) if label else None,
        ids=list(columns[header.index(ident)]) if ident else None,
    )


def _numeric_matrix(path: Path, arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim != 2:
        raise DataError(
            f"{path}: {what} must be a 2-D array [rows, features], got shape {arr.shape}"
        )
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: {what} has dtype {arr.dtype}, expected numbers")
    return arr.astype(np.float32)


def _load_npy(
    path: Path, label_column: str | None, id_column: str | None, strict: bool = True
) -> Dataset:
    arr = _np_load(path)
    x = _numeric_matrix(path, arr, "the array")
    return Dataset(x=x, feature_names=[f"f{i}" for i in range(x.shape[1])])


def _load_npz(
    path: Path, label_column: str | None, id_column: str | None, strict: bool = True
) -> Dataset:
    with _np_load(path) as z:
        keys = list(z.files)
        if "X" in keys:
            x_key = "X"
        elif "x" in keys:
            x_key = "x"
        elif len(keys) == 1:
            x_key = keys[0]
        else:
            raise DataError(f"{path}: no array named X or x among {keys}")
        x = _numeric_matrix(path, z[x_key], f"array {x_key!r}")
        label_key = label_column or next((k for k in ("y", "label") if k in keys), None)
        if label_column is not None and label_column not in keys:
            raise DataError(
                f"{path}: label array {label_column!r} is not in the file (arrays: {keys})"
            )
        labels = None
        if label_key is not None:
            y = z[label_key]
            if y.shape != (len(x),):
                raise DataError(
                    f"{path}: labels {label_key!r} have shape {y.shape}, expected ({len(x)},)"
                )
            labels = parse_labels(path, label_key, y.tolist())
        id_key = id_column or ("id" if "id" in keys else None)
        ids = [str(v) for v in z[id_key].tolist()] if id_key in keys else None
    return Dataset(x=x, feature_names=[f"f{i}" for i in range(x.shape[1])], labels=labels, ids=ids)


def _np_load(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        # Object arrays need pickle, which is never loaded.
        raise DataError(f"{path}: not a plain numeric array file ({e})") from None
    except (EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable numpy file ({e})") from None


def _load_parquet(
    path: Path, label_column: str | None, id_column: str | None, strict: bool = True
) -> Dataset:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow; install it (pip install 'cae-stream[train]')"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError mix
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    header = list(table.column_names)
    label = _pick_column(path, header, label_column, DEFAULT_LABEL_COLUMN, "label")
    ident = _pick_column(path, header, id_column, DEFAULT_ID_COLUMN, "id")
    features = [n for n in header if n not in (label, ident)]
    x = np.empty((table.num_rows, len(features)), dtype=np.float32)
    for k, name in enumerate(features):
        col = table.column(name)
        values = col.to_pylist()
        if _is_numeric_arrow(col.type):
            x[:, k] = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
        else:
            x[:, k] = _parse_numeric_column(
                path, name, ["" if v is None else str(v) for v in values], strict
            )
    return Dataset(
        x=x,
        feature_names=features,
        labels=parse_labels(path, label, table.column(label).to_pylist()) if label else None,
        ids=[str(v) for v in table.column(ident).to_pylist()] if ident else None,
    )


def _is_numeric_arrow(dtype) -> bool:
    import pyarrow.types as pat

    return pat.is_integer(dtype) or pat.is_floating(dtype) or pat.is_boolean(dtype)
