#!/usr/bin/env bash
# GPU check of the trainer's CUDA path on one GPU (rows a-f: benchmarks/README.md), ready for a machine that has
# torch with CUDA but no Ray and no network:
#   - the project is not pip-installed (its pyproject pins a torch build): PYTHONPATH points at this checkout,
#     and the machine's own torch is used;
#   - wheels in the git-ignored .whl/ folder, if any, are installed offline (--no-index --no-deps) into a
#     temporary target folder first (benchmarks/gpu_check_wheels.txt lists what belongs there: nothing today);
#   - nothing reaches the network.
# Without a CUDA device it prints a line starting with "SKIP:" and exits 0; with --require-gpu (or
# GPU_CHECK_REQUIRE=1) that skip exits 3 instead, so a job that must run the check cannot pass by skipping.
# Finishes in under 8 minutes on one H100 (hard stop at 470 s); the JSON report goes to $OUT/gpu_check.json
# when OUT is set.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu_dry_run    # every row at tiny sizes on CPU (what CI runs)
#   bash benchmarks/gpu_check.sh --require-gpu    # as the first, but no GPU is a failure (exit 3), not a skip
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python

dry=0
require=0
case "${GPU_CHECK_REQUIRE:-0}" in 1|true|yes) require=1 ;; esac
args=()
for a in "$@"; do
  case "$a" in
    --cpu_dry_run) dry=1; args+=("$a") ;;
    --require-gpu) require=1 ;;
    *) args+=("$a") ;;
  esac
done

if compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/medloom_gpu_check_site"
  rm -rf "$site"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl; then
    echo "FAIL: could not install the carried wheels in .whl/ (offline, --no-deps)"
    exit 1
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}   # deterministic cuBLAS (exact-resume row)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

if [ $dry -eq 0 ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "SKIP: no CUDA device (or no CUDA-enabled torch) on this machine; the GPU check needs one GPU." \
         "On CPU: bash benchmarks/gpu_check.sh --cpu_dry_run"
    [ $require -eq 1 ] && { echo "FAIL: --require-gpu (or GPU_CHECK_REQUIRE=1) is set and the check was skipped"; exit 3; }
    exit 0
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
timeout --kill-after=10 470 "$PY" benchmarks/gpu_check.py ${args[@]+"${args[@]}"}
rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  echo "FAIL: gpu_check.py ran past 470 s; finished rows are in ${OUT:-<work folder>}/gpu_check.json"
fi
exit $rc
