#!/usr/bin/env bash
# GPU path check for the trainer: a few FSDP2 + bf16 (+ flash-attn when installed) steps of a mid-size model on
# one CUDA device; prints tokens/s and MFU. Skips cleanly (exit 0) without a CUDA device. Under 5 minutes.
#
#   bash benchmarks/gpu_check.sh [--steps 20 --layers 8 --hidden 1024 --tokens 8192]
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "SKIP: no CUDA device (or no CUDA-enabled torch) on this machine; the GPU check needs one GPU."
  exit 0
fi
missing=$(python - <<'PY'
import importlib
need = ["pyarrow", "safetensors", "tokenizers", "yaml", "PIL", "numpy", "ray"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "SKIP: python packages missing on this machine: $missing (pip install -e . first)"
  exit 0
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export TOKENIZERS_PARALLELISM=false
timeout 280 python benchmarks/gpu_check.py "$@"
rc=$?
if [ $rc -eq 124 ]; then echo "FAIL: gpu_check.py ran past 280 s"; fi
exit $rc
