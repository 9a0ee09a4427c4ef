"""Cost of the contractive penalty per training step, against the same model without it.

    .venv/bin/python -m tests.bench.penalty [--rounds 15] [--steps 20] [--threads N]

One training step = forward + backward + Adam step on one batch (64 features,
256 rows). Every mode trains its own copy of the same initial model on the same
batch; modes are timed in alternating order, round after round, and the median
step time per mode is compared with "plain" (λ = 0), so drifting machine load
hits every mode alike. Goals: closed ≤ 1.3× plain, estimate (1 projection) ≤ 2×.

Two architectures: the default for 64 inputs (one sigmoid layer, where the closed
form is Σ_j φ'(a_j)² Σ_i W_ji²) and a deeper encoder (hidden 128, code 32), where
the closed form multiplies the layer Jacobians out per row.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from tests.bench.common import machine, markdown_table, now_iso, write_results
from training.penalty import cae_loss
from worker.model import CAEConfig, ContractiveAutoencoder

INPUT_DIM, BATCH = 64, 256
PENALTY_WEIGHT = 0.01
GOALS = {"closed": 1.3, "estimate": 2.0}
MODES = ["plain", "closed", "exact", "estimate"]


def architectures() -> dict[str, CAEConfig]:
    return {
        "default": CAEConfig.for_input(INPUT_DIM),
        "deep (hidden 128, code 32)": CAEConfig(input_dim=INPUT_DIM, hidden=(128,), code_dim=32),
    }


class Trainer:
    """One model copy and its optimiser, stepping in one penalty mode."""

    def __init__(self, model: ContractiveAutoencoder, mode: str, seed: int):
        self.model = copy.deepcopy(model).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.weight = 0.0 if mode == "plain" else PENALTY_WEIGHT
        self.mode = "closed" if mode == "plain" else mode
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, x: torch.Tensor) -> None:
        loss, _, _ = cae_loss(self.model, x, self.weight, self.mode, 1, self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def time_steps(trainer: Trainer, x: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(x)
    return (time.perf_counter() - start) / steps


def bench_architecture(config: CAEConfig, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step for each mode."""
    torch.manual_seed(0)
    model = ContractiveAutoencoder(config)
    x = torch.randn(BATCH, INPUT_DIM)
    trainers = {mode: Trainer(model, mode, seed=1) for mode in MODES}
    for trainer in trainers.values():
        time_steps(trainer, x, 5)  # warm-up: allocator, torch.func tracing
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for mode in order:
            samples[mode].append(time_steps(trainers[mode], x, steps))
    return {mode: statistics.median(times) for mode, times in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.penalty", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per timing sample")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = machine()
    rows, table = [], []
    for name, config in architectures().items():
        medians = bench_architecture(config, args.rounds, args.steps)
        plain = medians["plain"]
        for mode in MODES:
            ratio = medians[mode] / plain
            goal = GOALS.get(mode) if name == "default" else None
            rows.append(
                {
                    "architecture": name,
                    "encoder": config.encoder_sizes,
                    "activation": config.activation,
                    "mode": mode,
                    "ms_per_step": medians[mode] * 1e3,
                    "ratio_to_plain": ratio,
                    "goal": goal,
                    "met": None if goal is None else ratio <= goal,
                }
            )
            goal_text = (
                "" if goal is None else f"≤ {goal}× ({'met' if ratio <= goal else 'MISSED'})"
            )
            table.append([name, mode, f"{medians[mode] * 1e3:.3f}", f"{ratio:.2f}×", goal_text])
    results = {
        "benchmark": "penalty",
        "date": now_iso(),
        "machine": {**facts, "torch_threads": torch.get_num_threads()},
        "setup": {
            "input_dim": INPUT_DIM,
            "batch": BATCH,
            "penalty_weight": PENALTY_WEIGHT,
            "estimate_projections": 1,
            "rounds": args.rounds,
            "steps_per_sample": args.steps,
            "statistic": "median over rounds of mean step time; modes interleaved",
        },
        "results": rows,
    }
    path = write_results("penalty", results)
    print(markdown_table(["architecture", "mode", "ms / step", "vs plain", "goal"], table))
    print(
        f"\n{facts['cpu_count']} CPUs, torch {facts['torch']}, {torch.get_num_threads()} threads, "
        f"load {facts['load_avg_1m_at_start']} at start; written to {path}"
    )
    return results


if __name__ == "__main__":
    main()
