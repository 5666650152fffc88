#!/usr/bin/env bash
# Issue 15, Must 4: the test suite on CUDA, then the overhead benchmark on CUDA (MLP, 3C3D CNN, small GPT,
# ResNet-18-style; economy minus Alpha and economy, each also with overlap=True, torch.func norms; ratios
# to a plain step), where a step's time goes, an untracked step's cost, and the overhead budget's cost on
# the same models (benchmarks/budget.py), in under 5 minutes on one GPU. Run from anywhere:
#
#     bash benchmarks/gpu.sh                   # PYTHON=/path/to/python to choose the interpreter
#
# Settings (environment): GPU_TESTS (0: skip the tests, for a rerun of the benchmarks alone),
# GPU_TEST_WORKERS (pytest-xdist workers sharing the GPU, default 4; 0 = none),
# GPU_TEST_MAXFAIL (the tests stop after this many failures, default 10), GPU_TEST_TIMEOUT (seconds the
# tests may take before they are stopped and the benchmark runs, default 300),
# GPU_STEPS / GPU_REPS (steps per timed block / interleaved repetitions, default 5 / 7), GPU_MODELS,
# GPU_CONFIGS, GPU_OPTIMS, GPU_DEVICE (default cuda; cpu: a dry run of the script, where `-m cuda`
# selects no test and pytest exits 5), GPU_PROFILE (0: skip benchmarks/profile_step.py, where a step's
# time goes by torch.profiler), GPU_IDLE (0: skip benchmarks/idle.py, an untracked step's cost, on
# GPU_IDLE_MODELS, default mlp,gpt, over GPU_IDLE_STEPS rounds, default 500), GPU_BUDGET (0: skip
# benchmarks/budget.py, the overhead budget's cost per model; GPU_BUDGET_REPS interleaved 100-step blocks,
# default 3; 7 narrow its spread on a shared host: docs/performance.md, "GPU"). Everything printed also
# goes to $OUT/gpu.txt when OUT is set (the device runner's output folder), with the benchmark's rows in
# $OUT/overhead_gpu.json. On an H200 the whole script took 186 s (session 18).
# Exit status: that of the tests (the benchmark still runs after a failure), else the benchmark's.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
WORKERS=${GPU_TEST_WORKERS:-4}
STEPS=${GPU_STEPS:-5}
REPS=${GPU_REPS:-7}
MODELS=${GPU_MODELS:-mlp,cnn,gpt,resnet18}
CONFIGS=${GPU_CONFIGS:-economy-alpha,economy-alpha+overlap,economy,economy+overlap,func-norms}
OPTIMS=${GPU_OPTIMS:-sgd}
DEVICE=${GPU_DEVICE:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

JSON=""
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    JSON="$OUT/overhead_gpu.json"
    exec > >(tee "$OUT/gpu.txt") 2>&1
fi

section() { printf '\n=== %s (at %ds)\n' "$1" "$SECONDS"; }

section "device"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu --format=csv
else
    echo "nvidia-smi: not found"
fi
GPU_DEVICE="$DEVICE" "$PY" - <<'EOF'
import os
import sys

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if os.environ["GPU_DEVICE"].startswith("cuda") and not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: torch.cuda.is_available() is False: no CUDA device to run on")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}: {torch.cuda.get_device_name(i)}, capability {torch.cuda.get_device_capability(i)}")
EOF

# The built-in instruments live in instruments/ and install as cockpit_lite.instruments, and the presets
# and instruments are found by their entry points. A checkout that is not installed (pip install -e .) gets,
# for this run only, the link a development worktree has and its entry points (a dist-info folder made
# from pyproject.toml by benchmarks/checkout_metadata.py in a temporary folder on PYTHONPATH): nothing is
# installed.
if ! "$PY" -c "import cockpit_lite.instruments" 2>/dev/null; then
    if [[ -d instruments && ! -e cockpit_lite/instruments ]]; then
        ln -s ../instruments cockpit_lite/instruments
        trap 'rm -f cockpit_lite/instruments' EXIT
    fi
    "$PY" -c "import cockpit_lite.instruments" || { echo "cannot import cockpit_lite: pip install -e ." >&2; exit 2; }
fi
if ! "$PY" -c "import sys; from cockpit_lite.registry import available_presets; sys.exit(not available_presets())"; then
    meta=$(mktemp -d)
    "$PY" benchmarks/checkout_metadata.py "$meta" >/dev/null
    export PYTHONPATH="$PYTHONPATH:$meta"
    "$PY" -c "from cockpit_lite.registry import available_presets as a; print('entry points from $meta:', a())"
fi

tests_rc=0
if [[ "${GPU_TESTS:-1}" != 0 ]]; then
    section "tests on $DEVICE: pytest -m cuda (COCKPIT_TEST_DEVICES=$DEVICE)"
    parallel=()
    if [[ "$WORKERS" != 0 ]] && "$PY" -c "import xdist" 2>/dev/null; then
        parallel=(-n "$WORKERS" --dist loadfile)
    fi
    COCKPIT_TEST_DEVICES="$DEVICE" timeout "${GPU_TEST_TIMEOUT:-300}" "$PY" -m pytest -m cuda -q -p no:cacheprovider \
        --maxfail "${GPU_TEST_MAXFAIL:-10}" "${parallel[@]}" || tests_rc=$?
    echo "pytest exit status: $tests_rc$([[ $tests_rc == 124 ]] && echo ' (stopped: GPU_TEST_TIMEOUT)')"
fi

section "overhead on $DEVICE: models $MODELS, configs $CONFIGS, optimizers $OPTIMS, $REPS reps x $STEPS steps"
bench=("$PY" benchmarks/overhead.py --device "$DEVICE" --models "$MODELS" --configs "$CONFIGS"
    --optims "$OPTIMS" --steps "$STEPS" --reps "$REPS")
[[ -n "$JSON" ]] && bench+=(--json "$JSON")
echo "${bench[*]}"
bench_rc=0
"${bench[@]}" || bench_rc=$?

if [[ "${GPU_PROFILE:-1}" != 0 ]]; then
    section "where a step's time goes on $DEVICE (torch.profiler): plain and economy minus Alpha, models $MODELS"
    prof=("$PY" benchmarks/profile_step.py --device "$DEVICE" --models "$MODELS" --config economy-alpha)
    echo "${prof[*]}"
    "${prof[@]}" 2>&1 | grep -v "^USDT:" || bench_rc=$?
fi

if [[ "${GPU_IDLE:-1}" != 0 ]]; then
    IDLE_MODELS=${GPU_IDLE_MODELS:-mlp,gpt}
    section "untracked steps on $DEVICE: the hooks alone and the budget's rest steps, models $IDLE_MODELS"
    idle=("$PY" benchmarks/idle.py --device "$DEVICE" --models "$IDLE_MODELS" --steps "${GPU_IDLE_STEPS:-500}")
    echo "${idle[*]}"
    "${idle[@]}" || bench_rc=$?
fi

if [[ "${GPU_BUDGET:-1}" != 0 ]]; then
    section "overhead budget on $DEVICE: economy with budget=0.05 against plain training, models $MODELS"
    budget=("$PY" benchmarks/budget.py --device "$DEVICE" --models "$MODELS" --reps "${GPU_BUDGET_REPS:-3}")
    echo "${budget[*]}"
    "${budget[@]}" || bench_rc=$?
fi

section "done: tests $tests_rc, benchmark $bench_rc"
if [[ "$tests_rc" != 0 ]]; then
    exit "$tests_rc"
fi
exit "$bench_rc"
