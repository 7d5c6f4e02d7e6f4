#!/usr/bin/env bash
# Serving on one GPU, end to end: the engine driven directly against HTTP + Ray Serve, at
# concurrency 1, 16 and 64, on the 8B shape with 2 layers, every prompt starting with one shared
# 32K-token document, the host + Redis KV tiers on (a redis-server of its own).
# Run there from the repo root with ".gpu" carried (built here by `bash ../shared/gpu/pack.sh`):
#   bash bench/gpu_serve.sh 2>&1 | tee $OUT/gpu_serve.log
#   GPU_TESTS=0 bash bench/gpu_serve.sh --served fused_local   # no tests first; extra serve_load.py flags
# Served paths (bench/serve_load.py SERVED_PATHS): split_ray is session 4's layout (ingress hop,
# worker actor), fused_local the default of one replica since session 5 (both by default).
# By default runs the GPU tests of the fast path first (CUDA graphs against eager, the Triton kernels).
set -uo pipefail
source .gpu/install.sh >/dev/null || exit 1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${GPU_TESTS:-1}" = 1 ]; then
    python3 -m pytest -q -p no:cacheprovider tests/model_shards/test_cuda_graphs.py \
        tests/model_shards/test_triton_kernels.py tests/gpu 2>&1 | tail -5
fi

REDIS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes --maxmemory 8gb \
    --maxmemory-policy allkeys-lru >/dev/null
trap 'redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1' EXIT

python3 bench/serve_load.py --preset llama3-8b-shape --layers 2 --block-size 64 --num-kv-blocks 0 \
    --shared-prefix-len 32768 --input-len 256 --output-len 64 --concurrency 1 16 64 \
    --num-prompts 32 --overhead-requests 8 --request-rate inf \
    --host-kv-bytes $((8 << 30)) --redis-url "redis://127.0.0.1:$REDIS_PORT" \
    --slo-ttft-ms 2000 --slo-tpot-ms 50 --out "$OUT/serve_load_gpu.json" "$@"
