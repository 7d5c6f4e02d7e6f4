#!/usr/bin/env bash
# One device call for the foundation: GPU tests, block-size bench, engine TTFT/TPOT.
# Run there from the repo root with ".gpu" carried (see ../shared/gpu/README.md):
#   bash bench/gpu_foundation.sh
set -uo pipefail
source .gpu/install.sh >/dev/null || exit 1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/gpu tests/model_shards/test_logits_vs_hf.py 2>&1 | tail -5
python3 bench/block_size.py 2>&1 | tee "$OUT/block_size.txt"
python3 bench/engine_gpu.py --layers 2 --prompt-tokens 8192 32768 2>&1 | tee "$OUT/engine_gpu.txt"
