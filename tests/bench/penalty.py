"""Cost of the contractive penalty per training step, against the same model without it.

    .venv/bin/python -m tests.bench.penalty [--rounds 15] [--steps 20] [--threads N]

One training step = forward + backward + Adam step on one batch (64 features,
256 rows; the default architecture is also run at 1024 rows, see --large-batch). Every mode trains its own copy of the same initial model on the same
batch; modes are timed in alternating order, round after round, and the median
step time per mode is compared with "plain" (λ = 0), so drifting machine load
hits every mode alike. Each sample records wall time and the thread's CPU time
(time.thread_time: not counting time the process waits for a core on a busy machine);
the ratios and goals use wall time, the CPU-time ratio is reported beside it. Goals: closed ≤ 1.3× plain, estimate (1 projection) ≤ 2×.

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


def time_steps(trainer: Trainer, x: torch.Tensor, steps: int) -> tuple[float, float]:
    """(wall, thread CPU) seconds per step."""
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        trainer.step(x)
    return (time.perf_counter() - start) / steps, (time.thread_time() - cpu) / steps


def bench_architecture(
    config: CAEConfig, rounds: int, steps: int, batch: int = BATCH
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per step for each mode."""
    torch.manual_seed(0)
    model = ContractiveAutoencoder(config)
    x = torch.randn(batch, INPUT_DIM)
    trainers = {mode: Trainer(model, mode, seed=1) for mode in MODES}
    for trainer in trainers.values():
        time_steps(trainer, x, 5)  # warm-up: allocator, torch.func tracing
    samples: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for mode in order:
            samples[mode].append(time_steps(trainers[mode], x, steps))
    return {
        mode: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for mode, ts in samples.items()
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.penalty", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per timing sample")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, the trainer's default TRAIN_TORCH_THREADS)",
    )
    parser.add_argument(
        "--large-batch",
        type=int,
        default=1024,
        help="also run the default architecture at this batch size (0: skip)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # not whatever ran before in this process
    facts = machine()
    rows, table = [], []
    cases = [(name, config, BATCH) for name, config in architectures().items()]
    if args.large_batch:
        cases.append(("default", architectures()["default"], args.large_batch))
    for name, config, batch in cases:
        medians = bench_architecture(config, args.rounds, args.steps, batch)
        plain, plain_cpu = medians["plain"]
        for mode in MODES:
            wall, cpu = medians[mode]
            ratio = wall / plain
            goal = GOALS.get(mode) if name == "default" and batch == BATCH else None
            rows.append(
                {
                    "architecture": name,
                    "batch_rows": f"batch {batch}",
                    "encoder": config.encoder_sizes,
                    "activation": config.activation,
                    "mode": mode,
                    "batch": batch,
                    "ms_per_step": wall * 1e3,
                    "ratio_to_plain": ratio,
                    "cpu_ms_per_step": cpu * 1e3,
                    "cpu_time_ratio_to_plain": cpu / plain_cpu,
                    "goal": goal,
                    "met": None if goal is None else ratio <= goal,
                }
            )
            goal_text = (
                "" if goal is None else f"≤ {goal}× ({'met' if ratio <= goal else 'MISSED'})"
            )
            table.append(
                [
                    name,
                    batch,
                    mode,
                    f"{wall * 1e3:.3f}",
                    f"{ratio:.2f}×",
                    f"{cpu / plain_cpu:.2f}×",
                    goal_text,
                ]
            )
    results = {
        "benchmark": "penalty",
        "date": now_iso(),
        "machine": {**facts, "torch_threads": torch.get_num_threads()},
        "setup": {
            "input_dim": INPUT_DIM,
            "batch": BATCH,
            "large_batch": args.large_batch or None,
            "penalty_weight": PENALTY_WEIGHT,
            "estimate_projections": 1,
            "rounds": args.rounds,
            "steps_per_sample": args.steps,
            "statistic": "median over rounds of mean step time (wall; thread CPU beside it); "
            "modes interleaved",
        },
        "results": rows,
    }
    path = write_results("penalty", results)
    print(
        markdown_table(
            ["architecture", "batch", "mode", "ms / step", "vs plain", "CPU vs plain", "goal"],
            table,
        )
    )
    print(
        f"\n{facts['cpu_count']} CPUs, torch {facts['torch']}, {torch.get_num_threads()} threads, "
        f"load {facts['load_avg_1m_at_start']} at start; written to {path}"
    )
    return results


if __name__ == "__main__":
    main()
