#!/usr/bin/env bash
# One device call for the KV tiers: GPU tier tests, restore-or-recompute by context length (does
# the cost policy pick the faster?), every path's bandwidth and Redis shard scaling.
# Run there from the repo root with ".gpu" carried (see ../shared/gpu/README.md):
#   bash bench/gpu_tiers.sh
set -uo pipefail
source .gpu/install.sh >/dev/null || exit 1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
python3 -m pytest -q -p no:cacheprovider tests/gpu tests/kvcache/test_tiers_gpu.py tests/kvcache/test_cost_model.py 2>&1 | tail -5
python3 bench/restore_policy.py --device cuda 2>&1 | tee "$OUT/restore_policy.txt"
python3 bench/kv_tiers.py --device cuda --skip-ttft 2>&1 | tee "$OUT/kv_tiers.txt"
