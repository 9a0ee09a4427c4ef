"""Does the threshold deliver its target false-positive rate? Measured, not assumed.

    python -m training.tail_check [--seeds 5] [--train-rows 20000] [--fresh-rows 1000000]
                                  [--student-t DF]

For each seed: fit the trainer's default model on `--train-rows` synthetic normal
rows (correlated sensors driven by Gaussian latent factors, or Student-t ones with
`--student-t DF` for a heavier tail), calibrate thresholds for each target (and for
1/n, the lowest the trainer accepts from n calibration rows) from the fit's
calibration scores exactly as `python -m training --target-fpr …` would, then count
the share of `--fresh-rows` new normal rows at or above each threshold. Prints a
markdown table (the figures in docs/calibration.md come from it).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime

import numpy as np
import torch

from training.fit import TrainConfig, fit
from training.tail import TargetRateUnsupported, calibrate, fit_tail, lowest_supported_rate

TARGETS = (1e-2, 1e-3, 1e-4, 1e-5)
DIM, FACTORS = 8, 3
CHUNK = 200_000


def normal_rows(n: int, seed: int, student_t: float | None = None) -> np.ndarray:
    """Correlated sensors: FACTORS latent factors through one fixed mixing, plus
    independent noise. Gaussian factors: the same generator as tests/support.normal_rows;
    Student-t factors with `student_t` degrees of freedom: a heavier tail."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(42).normal(size=(FACTORS, DIM))
    if student_t is None:
        z = rng.normal(size=(n, FACTORS))
    else:
        z = rng.standard_t(student_t, size=(n, FACTORS))
    return (z @ mix + 0.1 * rng.normal(size=(n, DIM))).astype(np.float32)


def measure(
    seed: int, train_rows: int, fresh_rows: int, config: TrainConfig, student_t: float | None
) -> list[dict]:
    result = fit(normal_rows(train_rows, seed, student_t), [f"f{i}" for i in range(DIM)], config)
    scorer = result.scorer()
    fresh = np.concatenate(
        [
            scorer.score_batch(
                normal_rows(
                    min(CHUNK, fresh_rows - i), 10_000 + 100 * seed + i // CHUNK, student_t
                ),
                "none",
            ).scores
            for i in range(0, fresh_rows, CHUNK)
        ]
    ).astype(np.float64)
    rows = []
    for target in targets(len(result.calibration_scores)):
        try:
            cal = calibrate(result.calibration_scores, target)
        except TargetRateUnsupported as e:
            # what the tail's quantile would have delivered, had it not been refused
            tail = fit_tail(result.calibration_scores)
            forced = float(np.mean(fresh >= tail.quantile(target))) if tail else None
            rows.append(
                {
                    "seed": seed,
                    "target": target,
                    "refused": e.lowest,
                    "forced": forced,
                    "tail": tail,
                }
            )
            continue
        fpr = float(np.mean(fresh >= cal.threshold))
        rows.append(
            {"seed": seed, "target": target, "method": cal.method, "fpr": fpr, "tail": cal.tail}
        )
    return rows


def targets(n: int) -> list[float]:
    """TARGETS and the lowest rate n calibration rows support (1/n with a tail)."""
    return sorted({*TARGETS, lowest_supported_rate(n, tail=True)}, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.tail_check", description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--fresh-rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=TrainConfig().max_epochs)
    parser.add_argument("--student-t", type=float, default=None, metavar="DF")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = TrainConfig(max_epochs=args.epochs)
    started = time.monotonic()
    rows = [
        r
        for seed in range(args.seeds)
        for r in measure(seed, args.train_rows, args.fresh_rows, config, args.student_t)
    ]
    latent = "Gaussian" if args.student_t is None else f"Student-t ({args.student_t:g} df)"
    out = [
        f"{datetime.now(UTC):%Y-%m-%d}, {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", torch {torch.__version__}, {time.monotonic() - started:.0f} s; "
        f"{args.train_rows} training rows ({latent} latent factors, {config.max_epochs} epochs "
        f"at most), {args.fresh_rows} fresh rows, {args.seeds} seeds",
        "",
        "| target | threshold | measured FPR per seed | measured / target (min–max) |",
        "|---|---|---|---|",
    ]
    for target in sorted({r["target"] for r in rows}, reverse=True):
        these = [r for r in rows if r["target"] == target]
        name = f"{target:g}" + ("" if target in TARGETS else " (1/n)")
        measured = [r for r in these if "fpr" in r]
        if not measured:
            forced = [r["forced"] for r in these if r["forced"] is not None]
            ratios = [f / target for f in forced]
            out.append(
                f"| {name} | refused (lowest {these[0]['refused']:.3g}); had the tail "
                f"been used: | {', '.join(f'{f:.3g}' for f in forced)} | "
                + (f"{min(ratios):.2f}–{max(ratios):.2f} |" if ratios else "|")
            )
            continue
        ratios = [r["fpr"] / target for r in measured]
        methods = "/".join(sorted({r["method"] for r in measured}))
        fprs = ", ".join(f"{r['fpr']:.3g}" for r in measured)
        out.append(f"| {name} | {methods} | {fprs} | {min(ratios):.2f}–{max(ratios):.2f} |")
    tails = [r["tail"] for r in rows if r["tail"] is not None and r["target"] == TARGETS[0]]
    if tails:
        out += [
            "",
            "tails (t, σ, γ, n_peaks/n): "
            + "; ".join(
                f"{t.t:.4g}, {t.sigma:.3g}, {t.gamma:+.3f}, {t.n_peaks}/{t.n}" for t in tails
            ),
        ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
