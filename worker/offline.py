"""python -m worker score: score a file with the live model, through the worker's own scorer.

Output: CSV with the header ``row,score,p_value,is_anomaly`` (``id`` first when the
input has an id column), one line per good input row, in input order. Rows are
numbered from 1 (data rows; a CSV header is not a row). Bad rows are reported on
stderr with their number and left out.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from worker.checkpoint import CheckpointError, read_latest
from worker.datafile import DataError, load_dataset
from worker.scoring import load_scorer, resolve_device

CHUNK_ROWS = 65536


class ScoreError(Exception):
    """A user error in offline scoring; one line."""


def _align(names: list[str], model_names: list[str], path: Path, positional: bool) -> np.ndarray:
    """Column order that puts the file's features in the model's order."""
    if positional:  # .npy/.npz carry no names: the columns are the model's, in order
        if len(names) != len(model_names):
            raise ScoreError(
                f"{path}: {len(names)} feature columns, the model expects {len(model_names)}"
            )
        return np.arange(len(names))
    missing = [n for n in model_names if n not in names]
    extra = [n for n in names if n not in model_names]
    if missing:
        raise ScoreError(
            f"{path}: missing feature columns {missing[:5]} (the model's features: {model_names[:8]}…)"
        )
    if extra:
        raise ScoreError(
            f"{path}: unknown columns {extra[:5]}; name the label/id columns with --label-column/--id-column"
        )
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[n] for n in model_names])


def score_file(
    model_dir: Path, data: Path, out: Path, device: str = "cpu", label_column=None, id_column=None
) -> tuple[int, int]:
    """Score `data` into `out`; returns (rows written, bad rows left out)."""
    version = read_latest(model_dir)
    if version is None:
        raise ScoreError(
            f"{model_dir}: no LATEST; train a model first (python -m training --data FILE --out {model_dir})"
        )
    scorer = load_scorer(model_dir / version, resolve_device(device))
    ds = load_dataset(data, label_column=label_column, id_column=id_column, bad_rows="keep")
    cols = _align(
        ds.feature_names,
        scorer.feature_names,
        data,
        positional=data.suffix.lower() in (".npy", ".npz"),
    )
    x = ds.x[:, cols]
    good = np.isfinite(x).all(axis=1)
    for i in np.flatnonzero(~good):
        col = scorer.feature_names[int(np.argmax(~np.isfinite(x[i])))]
        print(
            f"row {i + 1}: skipped: column {col!r} is missing, not a number, NaN or Inf",
            file=sys.stderr,
        )
    rows = np.flatnonzero(good)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            (["id"] if ds.ids is not None else []) + ["row", "score", "p_value", "is_anomaly"]
        )
        for start in range(0, len(rows), CHUNK_ROWS):
            idx = rows[start : start + CHUNK_ROWS]
            res = scorer.score_batch(x[idx])
            for j, i in enumerate(idx.tolist()):
                line = [
                    i + 1,
                    f"{res.scores[j]:.9g}",
                    f"{res.p_values[j]:.6g}",
                    int(res.is_anomaly[j]),
                ]
                w.writerow(([ds.ids[i]] if ds.ids is not None else []) + line)
    return len(rows), int((~good).sum())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m worker score", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--label-column", default=None)
    p.add_argument("--id-column", default=None)
    args = p.parse_args(argv)
    try:
        written, bad = score_file(
            args.model_dir, args.data, args.out, args.device, args.label_column, args.id_column
        )
    except (ScoreError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(
        f"scored {written} rows into {args.out}"
        + (f"; {bad} bad rows left out (see above)" if bad else ""),
        file=sys.stderr,
    )
    return 0
