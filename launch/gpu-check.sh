#!/usr/bin/env bash
# The GPU check, as one script for a lent GPU machine (no internet there): installs the wheels
# carried in .whl/ (segmentation-models-pytorch, timm deps...; Ray is not needed), then prints
# training images/s for fp32 / bf16 / bf16+channels_last / +compile at 256 px batch 16, peak GPU
# memory, and the aggregate images/s of 1, 2 and 4 concurrent trial processes on the one GPU.
#
#   launch/gpu-check.sh [OUT_DIR]          # ~3-5 minutes on an H100
#
# Prepare the wheels on a machine with internet, from the repository root:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl segmentation-models-pytorch==0.6.0 safetensors huggingface_hub
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/gpu-check}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m tumorseg.gpucheck --size-px 256 --batch 16 --steps 30 --compile --json "$out/gpu-check.json" 2>&1 | tee "$out/gpu-check.txt"
