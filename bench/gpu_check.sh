#!/usr/bin/env bash
# The GPU check, in one go and under 10 minutes on one H100/H200-class GPU:
#   1. the CUDA tests and the Triton kernels' tests (compiled on the GPU against the CPU path), ~2 min;
#   2. bench/simulator.py on CUDA: 640x480, ideal and noisy, batch 1/8/32, Triton kernels and torch ops,
#      with v2e's EventEmulator on the same GPU for the ratio, ~3 min;
#   3. bench/gpu_steps.py: 3 bf16 training steps of every pretraining and finetuning config, ~4 min.
# Results under bench/results/: simulator-cuda-<gpu>.{json,md}, gpu-steps-cuda-<gpu>.{json,md} and the log
# of the whole check, gpu-check-cuda-<gpu>.log. Exit code 0 when every part passed.
#
# Run from anywhere: bash bench/gpu_check.sh. Environment:
#   PYTHON     the interpreter with torch and Triton (default python3)
#   V2E_ROOT   a v2e source tree (default: .v2e in the repository if there, else ../shared/reference/v2e)
# A folder .whl/ of wheels is installed first (into /tmp/evforge-site) for packages the machine lacks
# (hdf5plugin). bench/gpu_prepare.sh fills .whl/ and .v2e/ on a machine with network access; both are
# git-ignored, so name them in the device tool's `carry`. With $OUT set (the device tool), the result files
# are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/evforge-site \
    .whl/*.whl && export PYTHONPATH=/tmp/evforge-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # evforge from this checkout, installed or not
V2E=${V2E_ROOT:-}
if [ -z "$V2E" ] && [ -f .v2e/v2ecore/emulator.py ]; then V2E=.v2e; fi

mkdir -p bench/results
tag=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from machine import machine_info, machine_tag; \
print(machine_tag('cuda', machine_info()))" 2>/dev/null) || { echo "no CUDA device visible to $PY"; exit 2; }
log=bench/results/gpu-check-$tag.log
: >"$log"
status=0

run() {  # run NAME SECONDS COMMAND...: the command under a time limit, its output in the log too
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S) UTC, limit ${limit} s): $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit code $rc" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
"$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)
try:
    import triton; print('triton', triton.__version__)
except ImportError: print('triton: not installed (the simulator uses torch ops)')
try:
    import numba; print('numba', numba.__version__)
except ImportError: print('numba: not installed (the CPU side of the comparisons uses torch ops)')" 2>&1 | tee -a "$log"

run "CUDA and Triton tests" 150 "$PY" -m pytest -q -p no:cacheprovider -m "cuda or triton" tests
run "simulator benchmark on CUDA" 180 "$PY" bench/simulator.py --device cuda --resolutions 640x480 \
  --batches 1,8,32 --presets ideal,noisy --repeats 3 --no-e2e ${V2E:+--v2e-root "$V2E"}
run "bf16 training steps of every config" 220 "$PY" bench/gpu_steps.py --device cuda --precision bf16-mixed \
  --steps 3 --batch 16

if [ "$status" -eq 0 ]; then echo "gpu check: every part passed" | tee -a "$log"
else echo "gpu check: FAILURES, see $log" | tee -a "$log"; fi
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then  # the device tool brings back what is under $OUT
  cp bench/results/*"$tag"* "$OUT"/ 2>/dev/null
fi
exit "$status"
