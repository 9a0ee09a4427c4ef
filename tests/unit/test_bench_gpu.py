"""tests/bench/gpu.py in its CPU-only mode on tiny sizes: every section but the worker
runs, the results file is written and complete, GPU parts are marked "no CUDA"."""

from __future__ import annotations

import json

import pytest
import torch

from tests.bench import gpu


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two threads on two shared cores are slower here; the benchmark leaves it alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_only_quick_run(tmp_path, capsys):
    out = tmp_path / "gpu-cpu-only.json"
    returned = gpu.main(["--cpu-only", "--quick", "--no-worker", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["complete"] is True and written["mode"] == "cpu-only"
    assert written["skipped"]["gpu"] == "no CUDA (--cpu-only)"
    assert written["skipped"]["worker"] == "--no-worker"
    assert {r["device"] for r in written["scoring"]} == {"cpu"}
    calls = {(r["model"], r["path"], r["batch"]) for r in written["scoring"]}
    assert len(calls) == 2 * 2 * 2  # two models, two calls, two batch sizes
    assert all(r["rows_per_s"] > 0 for r in written["scoring"])
    for p in written["precision"]:
        assert p["compared"] == "bf16 vs fp32" and p["decision_agreement"] > 0.99
    assert written["reloads"]["memory"] == "no CUDA"
    assert written["machine"]["cuda_available"] is torch.cuda.is_available()
    assert returned["scoring"] == written["scoring"]
    assert "| default D=64 | cpu | eager | score_tensor |" in capsys.readouterr().out


def test_gpu_mode_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu.main(["--quick", "--out", str(tmp_path / "x.json")])
    assert "run with --cpu-only" in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "x.json").exists()


def test_time_budget_skips_sections(tmp_path):
    args = gpu.parse_args(
        ["--cpu-only", "--quick", "--budget-s", "0", "--out", str(tmp_path / "r.json")]
    )
    run = gpu.Run(args, args.out)
    models = {name: tmp_path / "never-read" for name in gpu.QUICK_MODELS}
    gpu.scoring_section(run, models)
    gpu.precision_section(run, models)
    gpu.reload_section(run, models["default D=64"])
    gpu.worker_section(run, models["default D=64"], tmp_path)
    skipped = run.results["skipped"]
    assert set(skipped) == {
        *(f"scoring {m}" for m in models),
        *(f"precision {m}" for m in models),
        "reloads",
        "worker",
    }
    assert all(why.startswith("time budget") for why in skipped.values())
    assert not run.results.get("scoring") and "reloads" not in run.results


def test_keep_going_without_cuda_records_each_cuda_part_and_keeps_the_cpu_figures(
    tmp_path, monkeypatch
):
    """What tests/bench/gpu_device.sh runs, on a machine where CUDA is missing: the run
    ends complete, with the CPU figures and one error per CUDA part."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    gpu.main(["--quick", "--keep-going", "--no-worker", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["complete"] is True and written["mode"] == "gpu, but no CUDA found"
    assert {(r["device"], r["mode"]) for r in written["scoring"]} == {("cpu", "eager")}
    errors = written["errors"]
    models = list(gpu.QUICK_MODELS)
    assert set(errors) == {
        "cuda",
        *(f"scoring {m} cuda {mode}" for m in models for mode in ("graphs", "eager")),
        *(f"precision {m}" for m in models),
        "reloads",
    }
    assert all(
        "CUDA" in why and "(at worker/" in why for key, why in errors.items() if key != "cuda"
    )


def test_error_text_names_the_project_frame():
    def fail():
        raise ValueError("first line\nsecond\nlast line")

    try:
        fail()
    except ValueError as e:
        text = gpu.error_text(e)
    assert text.startswith("ValueError: first line … last line (at tests/unit/test_bench_gpu.py:")
    assert text.endswith("in fail)")
