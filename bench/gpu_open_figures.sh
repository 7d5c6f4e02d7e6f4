#!/usr/bin/env bash
# The figures still open on the GPU, most wanted first, in ONE device call (~8 minutes on one
# H200 with every stage; each stage bounded by `timeout`, so a short budget still returns the
# first ones). Sessions lose device time to machine starts: one call that does it all is cheaper.
#   1. tests    GPU tests of the step uploads (one pinned staging copy a step) and of the V4
#               decode graphs (replay bit-equal to the static step run eagerly)
#   2. mhc      DeepSeek-V4's mHC kernels against their memory floor, and the stream_mixes tilings
#               (session 8: mHC 45 ms of a 16K-token chunk, ~10x its floor): pick the default
#   3. floor    dense TTFT / TPOT against transformers at 4K .. 130K and two batches (issue 12's
#               open figure: 4K and 8K lost by 2-7 ms in session 8)
#   4. graphs   DeepSeek-V4 decode steps eager against CUDA graphs at 1, 8 and 32 requests
#   5. last1m   DeepSeek-V4 at 1M tokens with the section profile of the last chunk (949 ms in
#               session 10 against 547 ms for the one before it: its HCA key count, 8187, was not
#               a multiple of 16 until sink_attention.aligned_rows)
#   6. redis    the Redis client against redis-benchmark by shards and value sizes, and the batched
#               host <-> device copies of those sizes (bench/redis_scaling.py)
# Run there from the repo root with ".gpu" carried (see ../shared/gpu/README.md):
#   bash bench/gpu_open_figures.sh                 # every stage
#   STAGES="floor graphs" bash bench/gpu_open_figures.sh
# Logs and JSON land in $OUT (at most 8 files come back from a device call).
set -uo pipefail
source .gpu/install.sh >/dev/null || exit 1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
STAGES=${STAGES:-"tests mhc floor graphs last1m redis"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
stamp() { echo "[$(date +%T)] $*"; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }

if wanted tests; then
    stamp tests
    timeout ${TESTS_S:-90} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_step_uploads.py \
        tests/model_shards/test_deepseek_v4_decode_graphs.py tests/model_shards/test_cuda_graphs.py \
        tests/model_shards/test_deepseek_v4_hyper_kernels.py 2>&1 | tail -4
fi
if wanted mhc; then
    stamp mhc
    timeout ${MHC_S:-60} python3 bench/deepseek_v4_mhc.py 2>&1 | tail -28
fi
if wanted floor; then
    stamp floor
    timeout ${FLOOR_S:-240} python3 bench/vs_transformers.py ${FLOOR_ARGS:---lengths 4000 8100 32700 130000 \
        --profile-lengths 4000} --budget-s $(( ${FLOOR_S:-240} - 30 )) > "$OUT/vs_transformers.log" 2>&1
    sed -n '/^Triton compiles inside/,/^wrote/p' "$OUT/vs_transformers.log" | cut -c1-160
fi
if wanted graphs; then
    stamp graphs
    timeout ${GRAPHS_S:-150} python3 bench/deepseek_v4_paged.py --preset deepseek-v4-flash-shape --device cuda \
        --lengths 1024 --model-max-length 0 --concurrency 1 8 32 --concurrency-prompt-tokens 4000 \
        --decode-graphs > "$OUT/deepseek_v4_graphs.log" 2>&1
    grep '"concurrency"' "$OUT/deepseek_v4_graphs.log" | cut -c1-260
fi
if wanted last1m; then
    stamp last1m
    timeout ${LAST1M_S:-120} python3 bench/deepseek_v4_paged.py --preset deepseek-v4-flash-shape --device cuda \
        --lengths 1048000 --model-max-length 0 --profile-length 1048000 > "$OUT/deepseek_v4_last1m.log" 2>&1
    tail -40 "$OUT/deepseek_v4_last1m.log" | cut -c1-300
fi
if wanted redis; then
    stamp redis
    timeout ${REDIS_S:-100} python3 bench/redis_scaling.py --device cuda --shard-counts 1 4 \
        --value-kib 823 1646 1935 5804 > "$OUT/redis_scaling.log" 2>&1
    tail -30 "$OUT/redis_scaling.log" | cut -c1-200
fi
stamp done
