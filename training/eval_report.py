"""Summaries, markdown tables and the plot of an evaluation run (training.evaluate)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

AUTOENCODER_FIELDS = (
    "target_fpr",
    "fpr_at_threshold",
    "tpr_at_threshold",
    "p_value_ks",
    "jacobian_fro",
    "jacobian_fro_sq",
    "penalty_weight",
    "epochs",
    "best_epoch",
)


def _target(summary: dict) -> str:
    """The target FPR trained for (older results.json have none)."""
    target = summary.get("target_fpr")
    return f"{target['mean']:.3g}" if target else ""


def _ms(values: Sequence[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def summarise(
    runs: list[dict],
    methods: Sequence[str],
    datasets: Sequence[str],
    sigmas: Sequence[float],
    groups: dict[str, Sequence[str]] | None = None,
    default: str | None = None,
) -> dict:
    """Mean and std over seeds per (data set, method), the mean over data sets (all,
    and per group), and every method's paired difference from `default` per group."""
    out: dict = {"per_dataset": {}, "mean_over_datasets": {}, "groups": {}}
    for ds in datasets:
        out["per_dataset"][ds] = {}
        for m in methods:
            rows = [r for r in runs if r["dataset"] == ds and r["method"] == m]
            if not rows:
                continue
            s = {
                "roc_auc": _ms([r["roc_auc"] for r in rows]),
                "pr_auc": _ms([r["pr_auc"] for r in rows]),
                "fit_s": _ms([r["fit_s"] for r in rows]),
                "roc_auc_drop": {
                    str(sig): _ms([r["roc_auc"] - r["noisy_roc_auc"][str(sig)] for r in rows])
                    for sig in sigmas
                },
            }
            for f in AUTOENCODER_FIELDS:
                if f in rows[0]:
                    s[f] = _ms([r[f] for r in rows])
            out["per_dataset"][ds][m] = s
    for m in methods:
        per = [out["per_dataset"][ds][m] for ds in datasets if m in out["per_dataset"][ds]]
        out["mean_over_datasets"][m] = {
            "roc_auc": float(np.mean([p["roc_auc"]["mean"] for p in per])),
            "pr_auc": float(np.mean([p["pr_auc"]["mean"] for p in per])),
        }
    for g, members in (groups or {}).items():
        members = [d for d in members if d in datasets]
        if not members:
            continue
        entry: dict = {"datasets": members, "mean": {}, "vs_default": {}}
        for m in methods:
            per = [out["per_dataset"][d][m] for d in members if m in out["per_dataset"][d]]
            entry["mean"][m] = {
                "roc_auc": float(np.mean([p["roc_auc"]["mean"] for p in per])),
                "pr_auc": float(np.mean([p["pr_auc"]["mean"] for p in per])),
                "roc_auc_drop": {
                    str(sig): float(np.mean([p["roc_auc_drop"][str(sig)]["mean"] for p in per]))
                    for sig in sigmas
                },
            }
        if default in methods:
            for m in methods:
                if m != default:
                    entry["vs_default"][m] = {
                        metric: group_paired_difference(runs, members, default, m, metric)
                        for metric in ("roc_auc", "pr_auc")
                    }
        out["groups"][g] = entry
    return out


def _seed_values(runs: list[dict], datasets, method: str, metric: str) -> dict:
    """{(data set, seed): value}; metric "noisy:σ" is the ROC-AUC under noise σ, "drop:σ"
    the ROC-AUC lost to it (clean − noisy)."""
    if metric.startswith("noisy:"):
        sig = metric.split(":", 1)[1]
        get = lambda r: r["noisy_roc_auc"][sig]  # noqa: E731
    elif metric.startswith("drop:"):
        sig = metric.split(":", 1)[1]
        get = lambda r: r["roc_auc"] - r["noisy_roc_auc"][sig]  # noqa: E731
    else:
        get = lambda r: r[metric]  # noqa: E731
    return {
        (r["dataset"], r["seed"]): get(r)
        for r in runs
        if r["method"] == method and r["dataset"] in datasets
    }


def group_paired_difference(runs: list[dict], datasets, a: str, b: str, metric: str) -> dict:
    """`a` − `b` averaged over the group's data sets, paired by seed (a seed fixes every
    set's split): per seed the mean over data sets of the difference on the same split,
    then the mean over seeds and its standard error."""
    va, vb = _seed_values(runs, datasets, a, metric), _seed_values(runs, datasets, b, metric)
    seeds = sorted({s for _, s in va})
    per_seed = []
    for s in seeds:
        keys = [(d, s) for d in datasets if (d, s) in va and (d, s) in vb]
        if keys:
            per_seed.append(np.mean([va[k] - vb[k] for k in keys]))
    d = np.asarray(per_seed, dtype=np.float64)
    if not len(d):
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "n": len(d)}


def paired_differences(runs: list[dict], datasets, a: str, b: str, metric: str = "roc_auc"):
    """Per data set, `a` − `b` on the same split (seed): the mean, its standard error
    over seeds, and on how many seeds `a` was at least as good. Paired, because the
    split moves both methods far more than they differ."""
    out = {}
    for ds in datasets:
        by_seed = {(r["seed"], r["method"]): r[metric] for r in runs if r["dataset"] == ds}
        seeds = sorted(s for s, m in by_seed if m == a and (s, b) in by_seed)
        if not seeds:
            continue
        d = np.array([by_seed[(s, a)] - by_seed[(s, b)] for s in seeds])
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        out[ds] = {"mean": float(d.mean()), "se": se, "wins": int((d >= 0).sum()), "n": len(d)}
    return out


def _pm(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _metric_table(summary: dict, datasets, methods, metric: str) -> list[str]:
    lines = [
        "| data set | group | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 2) + "|",
    ]
    for ds in datasets:
        cells = [_pm(summary["per_dataset"][ds][m][metric]) for m in methods]
        lines.append(f"| {ds} | {_group(summary, ds)} | " + " | ".join(cells) + " |")
    means = [f"**{summary['mean_over_datasets'][m][metric]:.3f}**" for m in methods]
    lines.append("| **mean, all** | | " + " | ".join(means) + " |")
    return lines


def _group(summary: dict, ds: str) -> str:
    return next((g for g, e in (summary.get("groups") or {}).items() if ds in e["datasets"]), "")


def _group_lines(results: dict) -> list[str]:
    """Per group: every method's mean ROC-AUC / PR-AUC and its paired difference from
    the default; then the contraction check (default vs λ = 0, clean and under noise)."""
    meta, summary = results["meta"], results["summary"]
    methods, sigmas = meta["methods"], meta["noise_sigmas"]
    default = meta.get("default_method")
    groups = summary.get("groups") or {}
    if not groups:
        return []
    n = len(meta["seeds"])
    out = [
        f"### Per group: mean over data sets, and {default} − each method, paired by split",
        "",
        f"The default ({default}) minus the method, averaged over the group's data sets "
        f"on the same splits: mean ± standard error over {n} seeds (positive: the default "
        "is better).",
        "",
        "| group (data sets) | method | ROC-AUC | default − method | PR-AUC | default − method |",
        "|---|---|---|---|---|---|",
    ]
    for g, e in groups.items():
        label = f"{g} ({len(e['datasets'])})"
        for m in methods:
            mean = e["mean"][m]
            vs = e["vs_default"].get(m)
            d_roc = f"{vs['roc_auc']['mean']:+.4f} ± {vs['roc_auc']['se']:.4f}" if vs else "—"
            d_pr = f"{vs['pr_auc']['mean']:+.4f} ± {vs['pr_auc']['se']:.4f}" if vs else "—"
            out.append(
                f"| {label} | {m} | {mean['roc_auc']:.3f} | {d_roc} | {mean['pr_auc']:.3f} | {d_pr} |"
            )
    # the contraction shows in the reconstruction score: compare it with λ = 0 there —
    # every CAE variant of the run scored the same way (cae:mae, cae@L:mae, cae_auto:mae,
    # a λ sweep) — when ae:mae is in the run, else the default with "ae"
    if "ae:mae" in methods:
        ae, caes = "ae:mae", [m for m in methods if m.startswith("cae") and m.endswith(":mae")]
    else:
        ae, caes = "ae", [default] if default in methods else []
    if caes and ae in methods:
        sig_cols = " | ".join(f"ROC-AUC lost σ={s}, − {ae}" for s in sigmas)
        out += [
            "",
            f"### Does the contraction earn its keep? λ > 0 − {ae} (λ = 0), paired",
            "",
            "Clean ROC-AUC difference (positive: the contraction helps), then the difference "
            "in ROC-AUC lost under input noise of σ training standard deviations (negative: "
            "the contraction loses less); mean ± standard error over seeds.",
            "",
            f"| group | method | ROC-AUC − {ae} | {sig_cols} |",
            "|---|---|---|" + "---|" * len(sigmas),
        ]
        for g, e in groups.items():
            for cae in caes:
                d = group_paired_difference(results["runs"], e["datasets"], cae, ae, "roc_auc")
                drops = [
                    group_paired_difference(results["runs"], e["datasets"], cae, ae, f"drop:{s}")
                    for s in sigmas
                ]
                cells = " | ".join(f"{x['mean']:+.4f} ± {x['se']:.4f}" for x in drops)
                out.append(f"| {g} | {cae} | {d['mean']:+.4f} ± {d['se']:.4f} | {cells} |")
    return out + [""]


def render_markdown(results: dict) -> str:
    meta, summary = results["meta"], results["summary"]
    datasets, methods, sigmas = meta["datasets"], meta["methods"], meta["noise_sigmas"]
    aes = [m for m in methods if m == "ae" or m.startswith(("cae", "ae:"))]
    n = len(meta["seeds"])
    out = [
        f"Command: `{meta.get('command', 'python -m training.evaluate')}` — "
        f"{meta['date']}, {meta['machine']}, {meta['wall_s']:.0f} s.",
        "",
        *_group_lines(results),
        f"### ROC-AUC (mean ± std over {n} seeds)",
        "",
        *_metric_table(summary, datasets, methods, "roc_auc"),
        "",
        f"### PR-AUC (average precision, mean ± std over {n} seeds)",
        "",
        *_metric_table(summary, datasets, methods, "pr_auc"),
        "",
        f"### Threshold at target FPR {meta['train_config']['target_fpr']:.0%} "
        "(measured on the test inliers) and p-value uniformity",
        "",
        "A set whose held-out rows cannot support the default target is trained at the "
        "lowest rate they support (the target column).",
        "",
        "| data set | method | test inliers | target | FPR | TPR (recall) "
        "| KS distance of inlier p-values |",
        "|---|---|---|---|---|---|---|",
    ]
    for ds in datasets:
        n_inl = next((r.get("n_test_inliers") for r in results["runs"] if r["dataset"] == ds), None)
        for m in aes:
            s = summary["per_dataset"][ds].get(m)
            if s and "fpr_at_threshold" in s:
                out.append(
                    f"| {ds} | {m} | {n_inl if n_inl is not None else ''} | "
                    f"{_target(s)} | {_pm(s['fpr_at_threshold'])} | {_pm(s['tpr_at_threshold'])} | "
                    f"{_pm(s['p_value_ks'])} |"
                )
    if "cae" in methods and "ae" in methods:
        out += [
            "",
            "### CAE − plain AE, paired by split (ROC-AUC)",
            "",
            "Same seed = same split for both; mean difference ± its standard error over "
            "seeds, and the seeds on which the CAE is at least as good.",
            "",
            "| data set | CAE − AE | seeds CAE ≥ AE |",
            "|---|---|---|",
        ]
        for ds, d in paired_differences(results["runs"], datasets, "cae", "ae").items():
            out.append(f"| {ds} | {d['mean']:+.4f} ± {d['se']:.4f} | {d['wins']}/{d['n']} |")
    sig_cols = " | ".join(f"ΔAUC σ={s}" for s in sigmas)
    out += [
        "",
        "### Contraction: encoder Jacobian on test rows, and ROC-AUC lost under input noise",
        "",
        "σ in training standard deviations per feature, added to every test row; "
        "ΔAUC = clean − noisy ROC-AUC (positive = lost).",
        "",
        f"| data set | method | λ | mean ‖J‖_F | {sig_cols} |",
        "|---|---|---|---|" + "---|" * len(sigmas),
    ]
    for ds in datasets:
        for m in methods:
            s = summary["per_dataset"][ds].get(m)
            if not s:
                continue
            lam = _pm(s["penalty_weight"], 4) if "penalty_weight" in s else "—"
            jac = _pm(s["jacobian_fro"], 2) if "jacobian_fro" in s else "—"
            drops = " | ".join(_pm(s["roc_auc_drop"][str(sig)]) for sig in sigmas)
            out.append(f"| {ds} | {m} | {lam} | {jac} | {drops} |")
    out += [
        "",
        "### Fit time (seconds, 2 cores)",
        "",
        "| data set | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for ds in datasets:
        cells = [f"{summary['per_dataset'][ds][m]['fit_s']['mean']:.2f}" for m in methods]
        out.append(f"| {ds} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def render_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, summary = results["meta"], results["summary"]
    datasets, methods, sigmas = meta["datasets"], meta["methods"], meta["noise_sigmas"]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(max(12, 2 + 1.1 * len(datasets)), 4.5), width_ratios=[3, 1]
    )
    width = 0.8 / len(methods)
    xs = np.arange(len(datasets))
    for i, m in enumerate(methods):
        means = [summary["per_dataset"][d][m]["roc_auc"]["mean"] for d in datasets]
        stds = [summary["per_dataset"][d][m]["roc_auc"]["std"] for d in datasets]
        ax1.bar(xs + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, label=m)
    ax1.set_xticks(xs, datasets, rotation=45, ha="right", fontsize=8)
    ax1.set_ylim(0.4, 1.0)
    ax1.set_ylabel("ROC-AUC")
    ax1.set_title(f"ROC-AUC, mean ± std over {len(meta['seeds'])} seeds")
    ax1.legend(fontsize=8, loc="lower left")
    grid = [0.0, *sigmas]
    for m in methods:
        mean_auc = [
            np.mean(
                [
                    summary["per_dataset"][d][m]["roc_auc"]["mean"]
                    - (summary["per_dataset"][d][m]["roc_auc_drop"][str(s)]["mean"] if s else 0.0)
                    for d in datasets
                ]
            )
            for s in grid
        ]
        ax2.plot(grid, mean_auc, marker="o", label=m)
    ax2.set_xlabel("Gaussian noise σ (training std units) added to test rows")
    ax2.set_ylabel("ROC-AUC, mean over data sets")
    ax2.set_title("Robustness to input noise")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
