"""CPU cost of the knn score's nearest-neighbour search, per scored row, against one
top-k over all reference rows (the selection before the two-level one).

    .venv/bin/python -m tests.bench.knn [--rounds 7] [--reference-rows 2048]

One thread (the worker's default `WORKER_TORCH_THREADS=1`). For each feature count D
and batch size B, three searches run on the same batches (distinct ones, 16,384 rows
in all), interleaved round after round
so drifting machine load hits all alike, and the median CPU time (time.thread_time)
per row is reported: "single top-k" (one matrix product and one top-k over M per
chunk of KNN_PAIRS // M rows, exact distances recomputed for the k winners: the
search up to issue 11), "nearest_neighbours" (worker.scoring: the two-level
selection on CPU) and "product only" (the chunks' matrix products alone: the floor
of any search that computes every distance). Both searches' neighbours are checked
to be the same rows before timing. Not part of `make bench`; prints a table, writes
nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tests.bench.common import markdown_table, now_iso
from worker.allocator import keep_freed_memory
from worker.scoring import KNN_PAIRS, nearest_neighbours

K = 5


def single_topk(xs, reference, ref_sq, k):
    chunk = max(1, KNN_PAIRS // reference.shape[0])
    dists, idx = [], []
    for start in range(0, xs.shape[0], chunk):
        x = xs[start : start + chunk]
        d2 = torch.addmm(ref_sq, x, reference.T, alpha=-2.0)
        i = torch.topk(d2, k, dim=1, largest=False, sorted=False).indices
        idx.append(i)
        dists.append((x[:, None, :] - reference[i]).square().sum(dim=2).sqrt())
    return torch.cat(dists), torch.cat(idx)


def product_only(xs, reference, ref_sq, k):
    chunk = max(1, KNN_PAIRS // reference.shape[0])
    for start in range(0, xs.shape[0], chunk):
        torch.addmm(ref_sq, xs[start : start + chunk], reference.T, alpha=-2.0)


SEARCHES = {
    "single top-k": single_topk,
    "nearest_neighbours": nearest_neighbours,
    "product only": product_only,
}


def cpu_us_per_row(search, batches, reference, ref_sq) -> float:
    t = time.thread_time()
    for xs in batches:
        search(xs, reference, ref_sq, K)
    return (time.thread_time() - t) / sum(len(xs) for xs in batches) * 1e6


@torch.inference_mode()
def main() -> None:
    keep_freed_memory()  # the worker's process setting (worker/allocator.py)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reference-rows", type=int, default=2048)
    p.add_argument("--dims", default="16,64")
    p.add_argument("--batches", default="64,1024,16384")
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    m = args.reference_rows
    rows, load = [], os.getloadavg()[0]
    for d in map(int, args.dims.split(",")):
        reference = torch.randn(m, d, generator=gen)
        ref_sq = reference.square().sum(dim=1)
        for b in map(int, args.batches.split(",")):
            # distinct batches, 16,384 rows in all: a top-k timed on the same small
            # input over and over runs several times faster (the CPU learns its branches)
            batches = [torch.randn(b, d, generator=gen) for _ in range(max(1, 16_384 // b))]
            for xs in batches[:4]:
                _, want = single_topk(xs, reference, ref_sq, K)
                _, got = nearest_neighbours(xs, reference, ref_sq, K)
                assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values)
            samples = {name: [] for name in SEARCHES}
            for _ in range(args.rounds):
                for name, search in SEARCHES.items():
                    samples[name].append(cpu_us_per_row(search, batches, reference, ref_sq))
            us = {name: statistics.median(s) for name, s in samples.items()}
            rows.append(
                [
                    f"{d}",
                    f"{b}",
                    f"{us['single top-k']:.2f}",
                    f"{us['nearest_neighbours']:.2f}",
                    f"{us['single top-k'] / us['nearest_neighbours']:.2f}×",
                    f"{us['product only']:.2f}",
                ]
            )
    print(
        f"{now_iso()}, M = {m}, k = {K}, 1 thread, torch {torch.__version__}, "
        f"{args.rounds} rounds interleaved, median CPU µs per row; "
        f"load (1 min) {load:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    header = ["D", "B", "single top-k", "nearest_neighbours", "speed-up", "product only"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
