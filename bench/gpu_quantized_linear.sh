#!/usr/bin/env bash
# One device call for the quantized-weight kernels (docs/quantized_weights.md): their tests on
# CUDA (bf16 natively, no interpreter), then bench/quantized_linear.py and bench/quantized_experts.py. Nothing to carry.
# Run there from the repo root:  bash bench/gpu_quantized_linear.sh
set -uo pipefail
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/model_shards/test_deepseek_v4_quantized_linear.py 2>&1 \
  | tail -25 | tee "$OUT/quantized_linear_tests.txt"
OUT=$OUT python3 bench/quantized_linear.py 2>&1 | tee "$OUT/quantized_linear.txt"
OUT=$OUT python3 bench/quantized_experts.py 2>&1 | tee "$OUT/quantized_experts.txt"
