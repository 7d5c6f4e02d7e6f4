#!/usr/bin/env bash
# One device call for the KV tiers (~5 minutes on one H200): restore-or-recompute at 4K..1M tokens
# (does the policy stay within 5% of the faster, document by document?), then where the Redis
# client loses as shards grow (threads vs processes vs the whole client, against summed
# redis-benchmark GET ceilings) and transfer rates by value size (DeepSeek-V4 block sizes).
# Each bench is bounded (timeout) and rewrites its JSON after each table or length.
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
stamp restore_policy
timeout ${POLICY_S:-160} python3 bench/restore_policy.py --device cuda --repeats 2 2>&1 | tee "$OUT/restore_policy.txt"
stamp redis_scaling
timeout ${SCALING_S:-75} python3 bench/redis_scaling.py --device cuda 2>&1 | tee "$OUT/redis_scaling.txt"
stamp done
