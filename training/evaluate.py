"""Detection quality on real data: the product's CAE against baselines, same splits.

    python -m training.evaluate            # full run: 16 data sets x 5 seeds
    python -m training.evaluate --quick    # 2 seeds, smaller training samples

Protocol, per data set and seed: train on a random 70% of the inliers, test on the
other 30% plus every anomaly. Methods, all on the same rows:

* ``cae``      — ``training.fit.fit`` with default ``TrainConfig`` and the product's
                 ``Scorer`` (what the worker would serve): the default detector, the
                 knn score (mean distance to the 5 nearest stored normal rows);
* ``cae:mae``  — the same fit scored by the autoencoder's reconstruction error (the
                 default before issue 11);
* ``ae:mae``   — the same with penalty weight 0: the plain autoencoder;
* ``iforest``  — sklearn IsolationForest, default parameters, random_state=seed;
* ``knn``      — mean Euclidean distance to the 5 nearest training inliers, on
                 inputs standardised with the training rows' mean and std;
* ``pca``      — squared reconstruction error of a PCA keeping 90% of the variance,
                 on standardised data.

and, named with ``--methods``: ``ae`` (λ = 0, default score), ``cae_auto``
(``penalty_weight="auto"``), ``cae@L`` (a fixed penalty weight L) and ``NAME:KIND``
(one of those scored with another score kind).

Data sets come in three groups (training.eval_datasets.GROUPS): "tuning" chose the
defaults, "confirmation" only confirms them, "legacy" (shuttle) is reported apart.
Every method is compared with the default by paired differences (same split).

Besides ROC-AUC and PR-AUC it measures, for the two autoencoders: the false-positive
rate on the test inliers at the calibrated threshold, the uniformity of their
p-values (KS), the encoder Jacobian's Frobenius norm on the test rows, and the
ROC-AUC under Gaussian noise of σ training standard deviations added to the test rows
(the same noise for every method). Writes results.json, results.md and eval.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
from torch.func import jacrev, vmap

from training import eval_datasets
from training.eval_report import render_markdown, render_plot, summarise
from training.fit import TrainConfig, apply_scaler, fit, holdout_size
from training.penalty import closed_form_penalty
from training.tail import supported_target

DATASETS = tuple(name for names in eval_datasets.GROUPS.values() for name in names)
# "cae" is the product's default (the knn score since issue 11); "cae:mae" and "ae:mae"
# are the autoencoder's reconstruction score with the default λ and λ = 0, where the
# contraction can show (the knn score does not use the autoencoder)
METHODS = ("cae", "cae:mae", "ae:mae", "iforest", "knn", "pca")
DEFAULT_METHOD = "cae"
KNN_K = 5
NOISE_SIGMAS = (0.05, 0.1, 0.2)
TRAIN_SHARE = 0.7
PCA_VARIANCE = 0.9
# Training inliers are capped (a seeded subsample) so the run stays within minutes on
# 2 cores; test rows are never subsampled. Only shuttle (31,910) and page_blocks (3,439)
# have more training inliers than the cap, which equals the default knn score's
# reference cap (TrainConfig.reference_rows), so the product keeps every training row.
MAX_TRAIN_ROWS = 2_048
QUICK_MAX_TRAIN_ROWS = 2_000
DEFAULT_OUT = Path("docs/eval")

Scores = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # inliers only
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]


def split_inliers(ds: eval_datasets.Dataset, seed: int, max_train_rows: int) -> Split:
    rng = np.random.default_rng([seed, 104729])
    inl = rng.permutation(np.flatnonzero(ds.y == 0))
    n_train = int(round(TRAIN_SHARE * len(inl)))
    train, rest = inl[:n_train], inl[n_train:]
    if len(train) > max_train_rows:
        train = train[:max_train_rows]  # already a random order
    test = np.concatenate([rest, np.flatnonzero(ds.y == 1)])
    return Split(ds.x[np.sort(train)], ds.x[test], ds.y[test], ds.feature_names)


def _metrics(y: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    return float(roc_auc_score(y, scores)), float(average_precision_score(y, scores))


def jacobian_norms(model: torch.nn.Module, x_scaled: np.ndarray) -> tuple[float, float]:
    """(mean over rows of ‖J‖_F, mean over rows of ‖J‖²_F) of the encoder at scaled rows.

    The first from the full per-row Jacobian (torch.func); the second is the quantity
    the training penalty uses, from training.penalty's closed form.
    """
    xt = torch.from_numpy(np.ascontiguousarray(x_scaled, dtype=np.float32))
    norms = []
    with torch.no_grad():
        for chunk in torch.split(xt, 2048):
            jac = vmap(jacrev(model.encode))(chunk)
            norms.append(jac.square().sum(dim=(1, 2)).sqrt())
        sq = closed_form_penalty(model, xt)[0].item()
    return float(torch.cat(norms).mean()), float(sq)


def _autoencoder(split: Split, config: TrainConfig) -> tuple[Scores, dict]:
    # a small set (wbc, wine) cannot support the default 1 % rate: train it at the
    # lowest rate its held-out rows support, which the manifest and the report name
    n_hold = holdout_size(len(split.x_train), config.holdout_fraction)
    config = config.model_copy(update={"target_fpr": supported_target(config.target_fpr, n_hold)})
    t0 = time.perf_counter()
    result = fit(split.x_train, split.feature_names, config)
    fit_s = time.perf_counter() - t0
    scorer = result.scorer()
    m = result.manifest
    batch = scorer.score_batch(split.x_test)
    inl = split.y_test == 0
    jac, jac_sq = jacobian_norms(result.model, apply_scaler(split.x_test, m.scaler))
    extra = {
        "fit_s": fit_s,
        "penalty_weight": m.penalty_weight,
        "epochs": m.metrics["epochs"],
        "best_epoch": m.metrics["best_epoch"],
        "fpr_at_threshold": float(batch.is_anomaly[inl].mean()),
        "target_fpr": m.target_fpr,
        "tpr_at_threshold": float(batch.is_anomaly[~inl].mean()),
        "p_value_ks": float(stats.kstest(batch.p_values[inl], "uniform").statistic),
        "jacobian_fro": jac,
        "jacobian_fro_sq": jac_sq,
    }
    return (lambda x: scorer.score_batch(x).scores), extra


def _iforest(split: Split, seed: int) -> tuple[Scores, dict]:
    t0 = time.perf_counter()
    model = IsolationForest(random_state=seed).fit(split.x_train)
    return (lambda x: -model.score_samples(x)), {"fit_s": time.perf_counter() - t0}


def _knn(split: Split) -> tuple[Scores, dict]:
    """The strongest simple semi-supervised baseline (ADBench): standardise on the
    training inliers, score = mean distance to the k nearest of them."""
    t0 = time.perf_counter()
    scaler = StandardScaler().fit(split.x_train)
    nn = NearestNeighbors(n_neighbors=KNN_K).fit(scaler.transform(split.x_train))

    def score(x: np.ndarray) -> np.ndarray:
        return nn.kneighbors(scaler.transform(x))[0].mean(axis=1)

    return score, {"fit_s": time.perf_counter() - t0}


def _pca(split: Split) -> tuple[Scores, dict]:
    t0 = time.perf_counter()
    scaler = StandardScaler().fit(split.x_train)
    pca = PCA(n_components=PCA_VARIANCE, svd_solver="full").fit(scaler.transform(split.x_train))

    def score(x: np.ndarray) -> np.ndarray:
        z = scaler.transform(x)
        return np.square(z - pca.inverse_transform(pca.transform(z))).sum(axis=1)

    extra = {"fit_s": time.perf_counter() - t0, "n_components": int(pca.n_components_)}
    return score, extra


def run_method(method: str, split: Split, seed: int) -> tuple[Scores, dict]:
    if ":" in method:  # the same fit, scored with another score kind
        base, kind = method.split(":", 1)
        config = run_config(base, seed).model_dump()
        return _autoencoder(split, TrainConfig.model_validate({**config, "score": kind}))
    if _is_ae(method):
        return _autoencoder(split, run_config(method, seed))
    return _other(method, split, seed)


def _is_ae(method: str) -> bool:
    return method in ("cae", "ae", "cae_auto") or method.startswith(("cae@", "cae:", "ae:"))


def run_config(method: str, seed: int) -> TrainConfig:
    if method == "cae":
        return TrainConfig(seed=seed)
    if method == "ae":
        return TrainConfig(seed=seed, penalty_weight=0.0)
    if method.startswith("cae@"):  # a fixed penalty weight, for comparisons
        return TrainConfig(seed=seed, penalty_weight=float(method[4:]))
    if method == "cae_auto":
        return TrainConfig(seed=seed, penalty_weight="auto")
    raise ValueError(f"unknown method {method!r}")


def _other(method: str, split: Split, seed: int) -> tuple[Scores, dict]:
    if method == "iforest":
        return _iforest(split, seed)
    if method == "knn":
        return _knn(split)
    if method == "pca":
        return _pca(split)
    raise ValueError(f"unknown method {method!r}")


def evaluate_split(
    dataset: str, seed: int, split: Split, methods: Sequence[str], sigmas: Sequence[float]
) -> list[dict]:
    noise_rng = np.random.default_rng([seed, 15485863])
    unit = split.x_train.std(axis=0)
    unit = np.where(unit > 1e-12, unit, 1.0)
    noise = noise_rng.standard_normal(split.x_test.shape)
    rows = []
    for method in methods:
        score, extra = run_method(method, split, seed)
        roc, pr = _metrics(split.y_test, score(split.x_test))
        noisy = {}
        for sigma in sigmas:
            x_noisy = (split.x_test + sigma * unit * noise).astype(np.float32)
            noisy[str(sigma)] = _metrics(split.y_test, score(x_noisy))[0]
        rows.append(
            {
                "dataset": dataset,
                "seed": seed,
                "method": method,
                "roc_auc": roc,
                "pr_auc": pr,
                "noisy_roc_auc": noisy,
                "n_train": len(split.x_train),
                "n_test_inliers": int((split.y_test == 0).sum()),
                "n_test_anomalies": int((split.y_test == 1).sum()),
                **extra,
            }
        )
    return rows


def run_evaluation(
    datasets: Sequence[str] = DATASETS,
    seeds: Sequence[int] = range(5),
    methods: Sequence[str] = METHODS,
    sigmas: Sequence[float] = NOISE_SIGMAS,
    max_train_rows: int = MAX_TRAIN_ROWS,
    log: Callable[[str], None] | None = None,
) -> dict:
    # The layers are tiny: intra-op threads cost more than they give on 2 cores.
    torch.set_num_threads(1)
    runs: list[dict] = []
    started = time.perf_counter()
    for name in datasets:
        for seed in seeds:
            ds = eval_datasets.load(name, seed)
            split = split_inliers(ds, seed, max_train_rows)
            rows = evaluate_split(name, seed, split, methods, sigmas)
            runs.extend(rows)
            if log:
                aucs = "  ".join(f"{r['method']}={r['roc_auc']:.3f}" for r in rows)
                log(f"{name:8s} seed {seed}: {aucs}")
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {_cpu_count()} CPU cores, torch "
        f"{torch.__version__} ({_threads(torch.get_num_threads())}), Python "
        f"{platform.python_version()}",
        "datasets": list(datasets),
        "seeds": list(seeds),
        "methods": list(methods),
        "default_method": DEFAULT_METHOD,
        "groups": {g: list(v) for g, v in eval_datasets.GROUPS.items()},
        "noise_sigmas": list(sigmas),
        "train_share": TRAIN_SHARE,
        "max_train_rows": max_train_rows,
        "pca_variance": PCA_VARIANCE,
        "train_config": TrainConfig().model_dump(mode="json"),
        "wall_s": time.perf_counter() - started,
    }
    groups = {g: [d for d in names if d in datasets] for g, names in eval_datasets.GROUPS.items()}
    summary = summarise(runs, methods, datasets, sigmas, groups, DEFAULT_METHOD)
    return {"meta": meta, "runs": runs, "summary": summary}


def _threads(n: int) -> str:
    return "1 thread" if n == 1 else f"{n} threads"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def write_outputs(results: dict, out_dir: Path, command: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    results["meta"]["command"] = command
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = render_markdown(results)
    (out_dir / "results.md").write_text(md)
    render_plot(results, out_dir / "eval.png")
    return md


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="2 seeds, training inliers capped at 2,000 rows"
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        choices=[*DATASETS, *eval_datasets.GROUPS],
        default=list(DATASETS),
        help="data sets or group names (tuning, confirmation, legacy)",
    )
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, quick 2)")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(METHODS)}")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default docs/eval)"
    )
    args = p.parse_args(argv)
    n_seeds = args.seeds or (2 if args.quick else 5)
    datasets = [d for name in args.datasets for d in eval_datasets.GROUPS.get(name, (name,))]
    results = run_evaluation(
        datasets=list(dict.fromkeys(datasets)),
        seeds=range(n_seeds),
        methods=args.methods or METHODS,
        max_train_rows=QUICK_MAX_TRAIN_ROWS if args.quick else MAX_TRAIN_ROWS,
        log=lambda line: print(line, flush=True),
    )
    command = "python -m training.evaluate" + (" " + " ".join(argv) if argv else "")
    md = write_outputs(results, args.out, command)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
