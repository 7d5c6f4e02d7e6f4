#!/usr/bin/env bash
# The figures still open on the GPU, most wanted first. Each stage is bounded by `timeout`, so a
# short budget still returns the first ones. Sessions lose device time to machine starts (~3 min a
# start): few calls that do it all are cheaper. Session 12 (H100) measured tests, graphs, last1m,
# fused1m, topk, topk1m, floor and bursts: docs/deepseek_v4.md and docs/benchmarks.md "Session 12".
# Session 13 measured engineproc and budgets, session 14 engineproc (twice), pacing0 and anatomy,
# session 15 densetests, anatomy (with a GIL switch-interval A/B), engineproc (four times) and floor
# (docs/benchmarks.md "Session 15"). Still open: engineproc twice on one machine (the spread between
# machines is 10-30%), profile; v4sp (2 GPUs), hcacore, mhc and redis on an H200.
#   1. tests    GPU tests of the step uploads (one pinned staging copy a step), the V4 decode graphs
#               (replay bit-equal to the static step run eagerly), the mHC kernels (tf32x3 default
#               tiling) and the flash-style chunk attention kernel (float32 now IEEE; session 11's
#               20 failures were TF32)
#   1b. densetests  the dense GPU tests: cuDNN plans and the varlen call of short chunks (session 15)
#               against float32, step uploads without a host wait, the engine on CUDA, decode graphs
#   2. graphs   DeepSeek-V4 decode steps eager against CUDA graphs at 1, 8 and 32 requests (session
#               12, H100: 12.3 / 13.2 / 14.3 ms a step eager, 3.0 / 4.1 / 4.6 ms replayed)
#   3. last1m   DeepSeek-V4 at 1M tokens with the section profile of the last chunk, default core
#               (auto: the fused kernel for CSA layers). H200 blocks: 20.92 s, last chunk 490 ms
#   4. fused1m  the same 1M prompt with --chunk-attention blocks: the A/B of auto in one call
#   5. hcacore  V4's HCA and CSA attention core for a 16K chunk at 128K / 512K / 1M: the layers' path
#               against the flash-style kernel in each tiling (session 11: CSA 12.6 vs 16.9 ms, HCA loses)
#   6. floor    dense TTFT / TPOT against transformers at 4K .. 130K and two batches, transformers at
#               a shape it ran just before (its SDPA goes to cuDNN, ~50-80 ms a plan per new shape, and
#               its decode makes a new shape every token); its first call at each length apart
#   6b. topk    V4's indexer top-k on one block of queries at 128K / 512K / 1M: the int64 ranking
#               against top_k_by_threshold on float32 scores, the default since session 12 (4.6 vs 7.4 ms)
#   6c. topk1m  the 1M prompt with --index-top-k ranked (the old default): end to end, against last1m
#   7. mhc      DeepSeek-V4's mHC kernels against their memory floor and the stream_mixes tilings
#   8. redis    the Redis client against redis-benchmark by shards and value sizes, and the batched
#               host <-> device copies of those sizes (bench/redis_scaling.py)
#   9. bursts   the A/B of burst gathering in one process (serve_load.py --arrival-gap-ab 0.004,0):
#               serve.arrival_gap_s 0.004 against 0 (off, the default since session 12), alternating, BURSTS_REPEATS
#               runs of each (5) at 1 (overhead), 16 and 64 streams, direct then through HTTP
#               (fused_direct, the gap changed on the live replica); per gap the median and min-max.
#               Session 11 ran each gap in a process of its own: 22-29% apart run to run, and its HTTP
#               rows never came (90 s bound). Estimate ~4 min: ~65 s model + engine, ~40 s Ray + replica,
#               ~10 s a repeat direct and ~15 s through HTTP (session 10-11 logs); bound BURSTS_S 360
#  10. v4sp     2 GPUs (kind nvidia-h200-x2): DeepSeek-V4 with sequence parallelism (a chunk's queries
#               split over 2 ranks, the state replicated) against one GPU at 128K / 512K / 1M: TTFT,
#               TPOT, greedy tokens equal (bench/deepseek_v4_sequence_parallel.py, ~5 min)
#  11. budgets  the dense engine's while-decoding step budget (2048 / 8192 / 16384) against the floor's
#               batches (bench/step_budgets.py, ~3 min): the 16 x 4K batch lost to transformers in session 12
#  13. engineproc  served through HTTP with the engine loop on the replica's thread (fused_direct_thread) and
#               in a child process (fused_direct_process, serve.engine_loop: process) against direct,
#               at 1 / 16 / 64 streams, bodies encoded before the clock (session 13); each run's
#               "engine:" line (session 14) gives its steps by kind and the loop's time by activity; ~5 min
#  14. pacing0  engineproc's process path at 16 and 64 streams with serve.stream_chunks_per_s 0 (a list
#               per step and stream; 500 a second per replica by default, set when the engine shared
#               the replica's GIL), direct the same; ~2.5 min. BURSTS_SERVED=fused_direct_process
#               runs stage 9 (the arrival-gap A/B) on the process path.
#  13b. engineproc2  direct against the default served path (fused_direct_process) ENGINEPROC_REPEATS
#               times (2) in one call, to tell the served loss from the spread between runs (~2.5 min a run)
#  15. anatomy  one engine step by its make-up (decode alone, prompts alone, prompts beside a decoding
#               batch) on the serve bench's shape, tiers off then on, with torch.profiler and cProfile
#               tops of one step each (bench/step_anatomy.py, ~1 min a run)
#  12. profile  where the served path's CPU goes at 16 and 64 streams (bench/serve_profile.py, py-spy;
#               ~3 min; PROFILE_SERVED, default fused_direct_process: the replica and its engine
#               child). py-spy is not in the pack: here, before the call,
#               pip download py-spy --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 -d .gpu/extra
#  16. overlap  scheduler.overlap_outputs off against on (session 19: a step's text made while the next
#               step runs), direct and served (fused_direct_process), OVERLAP_REPEATS pairs (1), ~5 min a pair
#  17. overhead  bench/serve_overhead.py on the serve bench's shape and tiers: c1 TTFT and c16 tok/s
#               layer by layer (loop thread, child process, LLMServer, HTTP, Serve direct ingress), ~4 min
#  18. path     one served request's TTFT stage by stage (bench/request_path.py), engine in a child process
#               then on a thread, the serve bench's shape and tiers, ~2 min
#  19. reask    a long text document asked about again: tokenizing in one call against exact parallel
#               chunks and their cached ids on the host's cores, then the re-ask's TTFT at 128K and 1M
#               tokens by preparation and engine (bench/tokenize_long.py, bench/reask_document.py), ~3 min
# Session 18 (no device time) added the fused layer kernels (model.fused_layer_kernels, on by default);
# their first GPU call, ~6 min: densetests (their tests on CUDA), the anatomy's eager steps fused
# against torch's ops, the floor with the unfused engine beside the default one:
#   ANATOMY_ARGS=--unfused-ab ANATOMY_TIERS=0 FLOOR_ARGS="--lengths 4000 8100 32700 130000 --profile-lengths 4000 \
#     --sections ours ours_unfused transformers" STAGES="densetests anatomy floor" bash bench/gpu_open_figures.sh
# Run there from the repo root with ".gpu" carried (see ../shared/gpu/README.md):
#   bash bench/gpu_open_figures.sh                       # stages 1-4 (~7 minutes)
#   STAGES="floor bursts" bash bench/gpu_open_figures.sh  # stages 6 and 9 (~8 minutes)
#   STAGES=bursts bash bench/gpu_open_figures.sh          # stage 9 alone (~4 minutes, bound 6)
#   STAGES="engineproc budgets" bash bench/gpu_open_figures.sh  # stages 13 and 11 (~8 minutes)
#   STAGES="topk topk1m hcacore mhc redis" bash bench/gpu_open_figures.sh
# Logs and JSON land in $OUT (at most 8 files come back from a device call).
set -uo pipefail
source .gpu/install.sh >/dev/null || exit 1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
STAGES=${STAGES:-"tests graphs last1m fused1m"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
stamp() { echo "[$(date +%T)] $*"; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
# The 1M-token flash-shape prompt with the last chunk's section profile: prompt_1m NAME [bench flags]
prompt_1m() {
    local name=$1; shift
    stamp "$name"
    timeout ${LAST1M_S:-120} python3 bench/deepseek_v4_paged.py --preset deepseek-v4-flash-shape --device cuda \
        --lengths 1048000 --model-max-length 0 --profile-length 1048000 "$@" > "$OUT/deepseek_v4_$name.log" 2>&1
    tail -40 "$OUT/deepseek_v4_$name.log" | cut -c1-300
}

if wanted tests; then
    stamp tests
    timeout ${TESTS_S:-120} python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_step_uploads.py \
        tests/model_shards/test_deepseek_v4_decode_graphs.py tests/model_shards/test_cuda_graphs.py \
        tests/model_shards/test_deepseek_v4_hyper_kernels.py tests/model_shards/test_deepseek_v4_chunk_attention_kernel.py \
        tests/gpu/test_deepseek_v4_worker_graphs.py \
        2>&1 | tail -12
fi
if wanted densetests; then
    stamp densetests
    timeout ${DENSETESTS_S:-150} python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_prefill_plans.py \
        tests/gpu/test_step_uploads.py tests/gpu/test_cuda_engine.py tests/model_shards/test_cuda_graphs.py \
        tests/engine/test_mixed_step_graphs.py tests/model_shards/test_layer_kernels.py \
        2>&1 | tail -12
fi
if wanted graphs; then
    stamp graphs
    timeout ${GRAPHS_S:-150} python3 bench/deepseek_v4_paged.py --preset deepseek-v4-flash-shape --device cuda \
        --lengths 1024 --model-max-length 0 --concurrency 1 8 32 --concurrency-prompt-tokens 4000 \
        --decode-graphs > "$OUT/deepseek_v4_graphs.log" 2>&1
    grep '"concurrency"' "$OUT/deepseek_v4_graphs.log" | cut -c1-260
fi
if wanted last1m; then
    prompt_1m last1m
fi
if wanted hcacore; then
    stamp hcacore
    timeout ${HCACORE_S:-150} python3 bench/deepseek_v4_chunk_attention.py 2>&1 | tail -24
fi
if wanted fused1m; then
    prompt_1m fused1m --chunk-attention blocks
fi
if wanted floor; then
    stamp floor
    timeout ${FLOOR_S:-240} python3 bench/vs_transformers.py ${FLOOR_ARGS:---lengths 4000 8100 32700 130000 \
        --profile-lengths 4000} --budget-s $(( ${FLOOR_S:-240} - 30 )) > "$OUT/vs_transformers.log" 2>&1
    sed -n '/^Triton compiles inside/,/^wrote/p' "$OUT/vs_transformers.log" | cut -c1-160
fi
if wanted topk; then
    stamp topk
    timeout ${TOPK_S:-90} python3 bench/deepseek_v4_top_k.py 2>&1 | tail -16
fi
if wanted topk1m; then
    prompt_1m topk1m --index-top-k ranked
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
    stamp bursts
    # The A/B tables end the log (a run cut short: the direct ones, then each HTTP run's line).
    timeout ${BURSTS_S:-360} env GPU_TESTS=0 bash bench/gpu_serve.sh --served ${BURSTS_SERVED:-fused_direct} --concurrency 16 64 \
        --arrival-gap-ab 0.004,0 --repeats ${BURSTS_REPEATS:-5} --out "$OUT/serve_bursts_ab.json" \
        > "$OUT/serve_bursts_ab.log" 2>&1
    tail -30 "$OUT/serve_bursts_ab.log" | cut -c1-200
fi
if wanted v4sp; then
    stamp v4sp
    timeout ${V4SP_S:-480} python3 bench/deepseek_v4_sequence_parallel.py --preset deepseek-v4-flash-shape \
        --device cuda --layers 4 --experts 16 --lengths 131072 524288 1048000 --sp 2 --time-budget-s 420 \
        > "$OUT/deepseek_v4_sequence_parallel.log" 2>&1
    tail -12 "$OUT/deepseek_v4_sequence_parallel.log" | cut -c1-200
fi
if wanted budgets; then
    stamp budgets
    timeout ${BUDGETS_S:-240} python3 bench/step_budgets.py --budgets 2048 8192 16384 \
        --batches 16x4000 64x1000 8x32000 > "$OUT/step_budgets.log" 2>&1
    grep -E "^budget|wrote" "$OUT/step_budgets.log" | cut -c1-200
fi
if wanted profile; then
    stamp profile
    python3 -m pip install -q --no-index --target /tmp/pyspy .gpu/extra/py_spy-*.whl && export PATH=/tmp/pyspy/bin:$PATH
    profiles=$(cd "$OUT" && pwd)/serve_profile  # before the cd: serve_profile.py runs from bench/
    shape=()  # PROFILE_SERVE_SHAPE=1: gpu_serve.sh's load (8B shape, 32K shared prefix, host + Redis tiers)
    if [ "${PROFILE_SERVE_SHAPE:-0}" = 1 ]; then
        PROFILE_REDIS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        redis-server --port "$PROFILE_REDIS_PORT" --save '' --appendonly no --daemonize yes --maxmemory 8gb >/dev/null
        shape=(--serve-bench-shape --redis-url "redis://127.0.0.1:$PROFILE_REDIS_PORT")
    fi
    (cd bench && timeout ${PROFILE_S:-240} python3 serve_profile.py --served ${PROFILE_SERVED:-fused_direct_process} \
        --levels ${PROFILE_LEVELS:-16 64} --output-lens ${PROFILE_OUTPUT_LENS:-1 64} --seconds ${PROFILE_SECONDS:-12} \
        "${shape[@]}" --out "$profiles") > "$OUT/serve_profile.log" 2>&1
    [ -n "${PROFILE_REDIS_PORT:-}" ] && redis-cli -p "$PROFILE_REDIS_PORT" shutdown nosave >/dev/null 2>&1
    tail -${PROFILE_TAIL:-60} "$OUT/serve_profile.log" | cut -c1-200
fi
if wanted anatomy; then
    stamp anatomy
    if [ "${ANATOMY_PLAIN:-1}" = 1 ]; then  # 0: only the run with the tiers on (the serve bench's)
        # an empty Triton cache: the first mixed step's compiles are those of a fresh replica
        TRITON_CACHE_DIR=$(mktemp -d) timeout ${ANATOMY_S:-120} python3 bench/step_anatomy.py ${ANATOMY_ARGS:-} \
            --out "$OUT/step_anatomy.json" > "$OUT/step_anatomy.log" 2>&1
        grep -vE "USDT|^\s*$" "$OUT/step_anatomy.log" | tail -${ANATOMY_TAIL:-24} | cut -c1-900
    fi
    if [ "${ANATOMY_TIERS:-1}" = 1 ]; then  # 0: only the plain run
        REDIS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        redis-server --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes --maxmemory 8gb >/dev/null
        stamp "anatomy, host + Redis tiers on"
        timeout ${ANATOMY_S:-120} python3 bench/step_anatomy.py --host-kv-bytes $((8 << 30)) \
            --redis-url "redis://127.0.0.1:$REDIS_PORT" --out "$OUT/step_anatomy_tiers.json" > "$OUT/step_anatomy_tiers.log" 2>&1
        grep -vE "USDT|^\s*$" "$OUT/step_anatomy_tiers.log" | tail -24 | cut -c1-900
        for interval in ${ANATOMY_SWITCH_MS:-}; do  # the tiers' I/O threads against the step's thread on the GIL
            stamp "anatomy, tiers on, GIL switch interval $interval ms"
            timeout ${ANATOMY_S:-120} python3 bench/step_anatomy.py --host-kv-bytes $((8 << 30)) --switch-interval-ms "$interval" \
                --redis-url "redis://127.0.0.1:$REDIS_PORT" --out "$OUT/step_anatomy_tiers_switch$interval.json" \
                > "$OUT/step_anatomy_tiers_switch$interval.log" 2>&1
            grep -E "step |first mixed" "$OUT/step_anatomy_tiers_switch$interval.log" | cut -c1-300
        done
        redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1
    fi
fi
if wanted engineproc2; then
    # direct against the default served path, ENGINEPROC_REPEATS times in one call: session 15's four
    # engineproc runs, each on another H100, put the served path at +5% to -30% of direct at 64 streams
    for run in $(seq 1 ${ENGINEPROC_REPEATS:-2}); do
        stamp "engineproc2, run $run"
        GPU_TESTS=0 timeout ${ENGINEPROC2_S:-200} bash bench/gpu_serve.sh --served fused_direct_process \
            --out "$OUT/serve_load_gpu_run$run.json" > "$OUT/serve_engine_process_run$run.log" 2>&1
        grep -E "load_c|against direct" "$OUT/serve_engine_process_run$run.log" | cut -c1-200
    done
fi
if wanted overlap; then
    # scheduler.overlap_outputs off against on (the default since session 19), direct and served
    # (the default path), alternating, OVERLAP_REPEATS pairs (1): the same machine for both
    for run in $(seq 1 ${OVERLAP_REPEATS:-1}); do
        for choice in off on; do
            stamp "overlap $choice, run $run"
            GPU_TESTS=0 timeout ${OVERLAP_S:-200} bash bench/gpu_serve.sh --served fused_direct_process \
                --overlap-outputs $choice --out "$OUT/serve_overlap_${choice}_run$run.json" \
                > "$OUT/serve_overlap_${choice}_run$run.log" 2>&1
            grep -E "load_c|against direct|engine:" "$OUT/serve_overlap_${choice}_run$run.log" | cut -c1-220
        done
    done
fi
if wanted overhead; then
    # Where served c1 TTFT's extra goes (session 19: +5 ms over direct): bench/serve_overhead.py's
    # layers one at a time on the serve bench's shape and tiers: the loop on a thread, in the
    # replica's child process, + LLMServer, + HTTP in process, + Serve's direct ingress
    stamp overhead
    OVERHEAD_REDIS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$OVERHEAD_REDIS_PORT" --save '' --appendonly no --daemonize yes --maxmemory 8gb >/dev/null
    timeout ${OVERHEAD_S:-300} python3 bench/serve_overhead.py --preset llama3-8b-shape --layers 2 --block-size 64 \
        --num-kv-blocks 4096 --shared-prefix-len 32768 --input-len 256 --output-len 64 --requests 32 \
        --concurrency 16 --host-kv-bytes $((8 << 30)) --redis-url "redis://127.0.0.1:$OVERHEAD_REDIS_PORT" \
        --layers-to-run in_process serve_direct --out "$OUT/serve_overhead.json" > "$OUT/serve_overhead.log" 2>&1
    redis-cli -p "$OVERHEAD_REDIS_PORT" shutdown nosave >/dev/null 2>&1
    sed -n '/^layer /,$p' "$OUT/serve_overhead.log" | cut -c1-200
fi
if wanted reask; then
    # A long text document asked about again (session 21): tokenizing one call against exact
    # parallel chunks and their cached ids on this host's cores (bench/tokenize_long.py), then
    # the re-ask's TTFT on the GPU, split into preparation and engine (bench/reask_document.py)
    stamp "reask: tokenizing"
    timeout ${TOKENIZE_S:-90} python3 bench/tokenize_long.py --tokens 250000 1000000 --repeats 3 \
        --out "$OUT/tokenize_long.json" > "$OUT/tokenize_long.log" 2>&1
    cat "$OUT/tokenize_long.log" | cut -c1-200
    stamp "reask: the document asked twice"
    timeout ${REASK_S:-300} python3 bench/reask_document.py --preset llama3-8b-shape --layers 2 \
        --tokens ${REASK_TOKENS:-131072 1000000} --out "$OUT/reask_document.json" > "$OUT/reask_document.log" 2>&1
    tail -12 "$OUT/reask_document.log" | cut -c1-200
fi
if wanted path; then
    # One served request's TTFT stage by stage in the replica process (bench/request_path.py), the
    # serve bench's shape and tiers: the engine in the replica's child process, then on its thread
    PATH_REDIS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$PATH_REDIS_PORT" --save '' --appendonly no --daemonize yes --maxmemory 8gb >/dev/null
    for loop in process thread; do
        stamp "path, engine loop $loop"
        timeout ${PATH_S:-120} python3 bench/request_path.py --preset llama3-8b-shape --layers 2 --block-size 64 \
            --num-kv-blocks 4096 --shared-prefix-len 32768 --input-len 256 --requests 24 --engine-loop $loop \
            --host-kv-bytes $((8 << 30)) --redis-url "redis://127.0.0.1:$PATH_REDIS_PORT" \
            --out "$OUT/request_path_$loop.json" > "$OUT/request_path_$loop.log" 2>&1
        sed -n '/^stage /,$p' "$OUT/request_path_$loop.log" | cut -c1-240
    done
    redis-cli -p "$PATH_REDIS_PORT" shutdown nosave >/dev/null 2>&1
fi
if wanted pacing0; then
    stamp pacing0
    GPU_TESTS=0 timeout ${PACING0_S:-240} bash bench/gpu_serve.sh --served fused_direct_process --concurrency 16 64 \
        --stream-chunks-per-s 0 --out "$OUT/serve_pacing0.json" > "$OUT/serve_pacing0.log" 2>&1
    grep -E "load_c|against direct|added by|engine:" "$OUT/serve_pacing0.log" | cut -c1-260
fi
if wanted engineproc; then
    stamp engineproc
    GPU_TESTS=0 timeout ${ENGINEPROC_S:-420} bash bench/gpu_serve.sh --served fused_direct_thread fused_direct_process \
        > "$OUT/serve_engine_process.log" 2>&1
    grep -E "load_c|overhead:|against direct|added by|engine:" "$OUT/serve_engine_process.log" | cut -c1-260
fi
stamp done
