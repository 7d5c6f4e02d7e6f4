#!/usr/bin/env bash
# One device call for the KV tiers (~6 of its 10 minutes on one H200): GPU tier tests and the
# cost-model tests, then restore-or-recompute at 4K..1M tokens (does the policy stay within 5% of
# the faster?), then every path's bandwidth, Redis value parts and shard scaling with CPU seconds
# per GB. Each bench is bounded (timeout) and rewrites its JSON after each table or length.
# Run there from the repo root with ".gpu" carried (see ../shared/gpu/README.md):
#   bash bench/gpu_tiers.sh
set -uo pipefail
source .gpu/install.sh >/dev/null || exit 1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "cpus: $(nproc)"
stamp() { echo "[$(date +%T)] $*"; }
stamp tests
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/kvcache/test_tiers_gpu.py tests/kvcache/test_cost_model.py \
    2>&1 | tail -3
stamp restore_policy
timeout 300 python3 bench/restore_policy.py --device cuda 2>&1 | tee "$OUT/restore_policy.txt"
stamp kv_tiers
timeout 150 python3 bench/kv_tiers.py --device cuda --skip-ttft 2>&1 | tee "$OUT/kv_tiers.txt"
stamp done
