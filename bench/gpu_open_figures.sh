#!/usr/bin/env bash
# The figures still open on the GPU, most wanted first (~14 minutes on one H100 with every stage,
# so two device calls: the default STAGES, then STAGES="fused1m floor mhc redis"; each stage is
# bounded by `timeout`, so a short budget still returns the first ones). Sessions lose device
# time to machine starts: few calls that do it all are cheaper.
#   1. tests    GPU tests of the step uploads (one pinned staging copy a step), the V4 decode graphs
#               (replay bit-equal to the static step run eagerly), the mHC kernels (tf32x3 default
#               tiling) and the flash-style chunk attention kernel
#   2. graphs   DeepSeek-V4 decode steps eager against CUDA graphs at 1, 8 and 32 requests (session
#               10: eager 19.5 ms a step, launch-bound; the graph rows never ran)
#   3. last1m   DeepSeek-V4 at 1M tokens with the section profile of the last chunk (949 ms in
#               session 10 against 548 ms for the one before it: its HCA key count, 8187, was not
#               a multiple of 16 until sink_attention.aligned_rows)
#   4. hcacore  V4's HCA and CSA attention core for a 16K chunk at 128K / 512K / 1M: the layers' path against
#               the flash-style kernel (chunk_attention_kernel.py, not the default yet) in each tiling
#   5. fused1m  the 1M prompt again with that kernel in the layers (model.deepseek_v4_chunk_attention
#               blocks, through --chunk-attention blocks): the 1M prompt on the old core, to compare
#   6. floor    dense TTFT / TPOT against transformers at 4K .. 130K and two batches, transformers at
#               a shape it ran just before (its SDPA goes to cuDNN, ~50-80 ms a plan per new shape, and
#               its decode makes a new shape every token); its first call at each length apart
#   7. mhc      DeepSeek-V4's mHC kernels against their memory floor and the stream_mixes tilings
#               (session 10 picked 128 rows, 8 splits, tf32x3: 0.097 ms against 0.599 at 2K tokens)
#   8. redis    the Redis client against redis-benchmark by shards and value sizes, and the batched
#               host <-> device copies of those sizes (bench/redis_scaling.py)
#   9. bursts   served TTFT at 16 and 64 streams (fused_direct against direct): as is, with an idle
#               engine gathering a burst (--arrival-gap-s 0.004), and with 8192 prompt tokens a step
#               beside decodes (--while-decoding-tokens 8192): session 10 traced the loss to a burst
#               split over steps at the 2048-token budget; ~5 minutes (its own call)
# Run there from the repo root with ".gpu" carried (see ../shared/gpu/README.md):
#   bash bench/gpu_open_figures.sh                 # stages 1-4 (~8 minutes)
#   STAGES="fused1m floor mhc redis" bash bench/gpu_open_figures.sh   # stages 5-8 (~6 minutes)
#   STAGES=bursts bash bench/gpu_open_figures.sh                       # stage 9 (~5 minutes)
#   STAGES="graphs hcacore" bash bench/gpu_open_figures.sh
# Logs and JSON land in $OUT (at most 8 files come back from a device call).
set -uo pipefail
source .gpu/install.sh >/dev/null || exit 1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
STAGES=${STAGES:-"tests graphs last1m hcacore"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
stamp() { echo "[$(date +%T)] $*"; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }

if wanted tests; then
    stamp tests
    timeout ${TESTS_S:-90} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_step_uploads.py \
        tests/model_shards/test_deepseek_v4_decode_graphs.py tests/model_shards/test_cuda_graphs.py \
        tests/model_shards/test_deepseek_v4_hyper_kernels.py tests/model_shards/test_deepseek_v4_chunk_attention_kernel.py \
        2>&1 | tail -4
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
if wanted hcacore; then
    stamp hcacore
    timeout ${HCACORE_S:-150} python3 bench/deepseek_v4_chunk_attention.py 2>&1 | tail -24
fi
if wanted fused1m; then
    stamp fused1m
    timeout ${LAST1M_S:-120} python3 bench/deepseek_v4_paged.py --preset deepseek-v4-flash-shape --device cuda \
        --lengths 1048000 --model-max-length 0 --profile-length 1048000 --chunk-attention blocks \
        > "$OUT/deepseek_v4_fused1m.log" 2>&1
    tail -40 "$OUT/deepseek_v4_fused1m.log" | cut -c1-300
fi
if wanted floor; then
    stamp floor
    timeout ${FLOOR_S:-240} python3 bench/vs_transformers.py ${FLOOR_ARGS:---lengths 4000 8100 32700 130000 \
        --profile-lengths 4000} --budget-s $(( ${FLOOR_S:-240} - 30 )) > "$OUT/vs_transformers.log" 2>&1
    sed -n '/^Triton compiles inside/,/^wrote/p' "$OUT/vs_transformers.log" | cut -c1-160
fi
if wanted mhc; then
    stamp mhc
    timeout ${MHC_S:-60} python3 bench/deepseek_v4_mhc.py 2>&1 | tail -28
fi
if wanted redis; then
    stamp redis
    timeout ${REDIS_S:-100} python3 bench/redis_scaling.py --device cuda --shard-counts 1 4 \
        --value-kib 823 1646 1935 5804 > "$OUT/redis_scaling.log" 2>&1
    tail -30 "$OUT/redis_scaling.log" | cut -c1-200
fi
if wanted bursts; then
    for variant in "" "--arrival-gap-s 0.004" "--while-decoding-tokens 8192"; do
        stamp "bursts ${variant:-as is}"
        name=serve_bursts${variant:+_${variant//[^a-z0-9]/}}
        timeout ${BURSTS_S:-100} env GPU_TESTS=0 bash bench/gpu_serve.sh --served fused_direct --concurrency 16 64 \
            $variant --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
        grep -E "^(direct|http_fused_direct) |against direct" "$OUT/$name.log" | cut -c1-160
    done
fi
stamp done
