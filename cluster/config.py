"""The one configuration of longctx: frozen, layered, validated once.

YAML file -> CLI overrides -> `LongctxConfig` -> every component. Defaults live here and only
here; argparse reads them from these classes. Nothing mutates a config after it is built: a
per-rank or per-request variant is made with `model_copy(update=...)`.
Extra keys are rejected so that a typo in a YAML file is an error, not a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

# Host memory that stages Redis blocks when redis_urls are set and host_bytes is not.
DEFAULT_REDIS_STAGING_BYTES = 1 << 30
DEFAULT_BLOCK_SIZE = 64  # tokens per KV block when cache.block_size is not set (dense models)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSettings(_Frozen):
    """Which model folder to serve and how to hold its weights."""

    path: str = Field("", description="Hugging Face model folder (config.json, safetensors, tokenizer.json).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and activations; auto: config.json's torch_dtype on GPU, float32 on CPU."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    quantized_weights: Literal["dequantize", "keep"] = Field(
        "dequantize", description="Weights a DeepSeek-V4 checkpoint stores quantized (FP8 blocks, FP4 experts): "
        "dequantize: to bf16 at load; keep: held in their format and multiplied by the Triton kernels on a GPU "
        "(docs/quantized_weights.md). keep is a no-op for a folder without quantization_config or another model."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + output in tokens; default: the model's max_position_embeddings."
    )
    attention_backend: str = Field(
        "auto", description="Name in model_shards.attention's registry; auto: cudnn_triton (Triton paged decode, "
        "cuDNN prefill) on a GPU in bf16/fp16, torch_sdpa (the reference) elsewhere."
    )
    # The layers' path writes each block of queries' logits; at 1M tokens an HCA layer's are ~17 GB
    # a 16K-token chunk. The fused kernel streams the keys through one online softmax instead:
    # faster for CSA layers on an H200, slower for HCA ones (session 11), so `auto` mixes them.
    deepseek_v4_chunk_attention: Literal["auto", "blocks", "fused"] = Field(
        "auto", description="DeepSeek-V4 prefill chunks' attention core (model_shards/deepseek_v4/chunk_cores.py): "
        "blocks: logits a block of queries at a time, then the softmax kernel; fused: one flash-style Triton kernel "
        "(chunk_attention_kernel.py) where it applies (entries in the activations' dtype; without a GPU it runs in "
        "Triton's interpreter, for tests); auto: fused for CSA layers on a GPU, blocks for the rest. "
        "Other models: ignored."
    )
    # The indexer's top-k at 1M tokens ranks 16K x 262K scores a chunk (113 ms of the last chunk's
    # 510 on an H100, session 11). `threshold` picks the same entries from float32 scores without
    # int64 keys: 4.6 against 7.4 ms on one block of queries at 512K and 1M, and a 1M prefill in
    # 20.1 against 21.7 s (H100, session 12, bench/deepseek_v4_top_k.py and the topk1m stage).
    deepseek_v4_index_top_k: Literal["ranked", "threshold"] = Field(
        "threshold", description="DeepSeek-V4 indexer's top-k of a prefill chunk (model_shards/deepseek_v4/"
        "kernel_choices.py): ranked: one top-k over int64 keys the scores kernel writes; threshold: a top-k of "
        "float32 scores for each row's k-th, ties earliest first (threshold_top_k.py). Both choose the same "
        "entries. Other models: ignored."
    )
    # Decode steps replay a captured graph (model_shards/cuda_graphs.py): the 2-layer 8B-shaped
    # model spent 4-5 ms a token in eager Python and kernel launches against ~1 ms of GPU work.
    cuda_graph_max_batch: int = Field(
        256, ge=0, description="Largest decode batch run as a CUDA graph (GPU, one rank); 0: always eager."
    )
    # A prompt joining a decoding batch made the whole step eager: the decodes' launches and block
    # tables cost host time that the GPU waited for. Replaying the decodes' graph first lets the
    # host launch the prompts' kernels while the GPU runs it; the price is a second read of the
    # weights, which a few hundred prompt tokens hide and a long chunk does not. Served on an H100
    # (session 17) it won beside 15 decodes as well as beside 60 (docs/benchmarks.md).
    mixed_step_graph_max_prompt_tokens: int = Field(
        2048, ge=0, description="A step that mixes decodes with at most this many prompt tokens replays the "
        "decodes' CUDA graph and runs only the prompt chunks eagerly (model_shards/worker.py); 0: such steps "
        "run wholly eager."
    )
    # An eager step launched ~34 elementwise kernels a layer (norms, residual adds, RoPE, SiLU),
    # ~1,000 a step on a 32-layer model at ~4-5 us of host time each; fused they are 4 a layer.
    fused_layer_kernels: bool = Field(
        True, description="Llama-family layers run their norms with the residual add, RoPE of q and k, and "
        "SiLU-and-multiply as three fused Triton kernels (model_shards/layer_kernels.py) on a GPU; false: the "
        "torch ops, as on a CPU."
    )


class CacheSettings(_Frozen):
    """The device KV cache: paged blocks plus automatic prefix caching."""

    # 64 tokens: long contexts favour large blocks (1M tokens = 16,384 blocks instead of 65,536 at
    # 16, so block tables, hashing and scheduler metadata shrink 4x) while prefix sharing stays
    # fine-grained enough for chat turns. bench/engine_cpu.py measures hashing and scheduling per
    # block size; bench/block_size.py the paged decode and spill rates on a GPU.
    block_size: int | None = Field(
        None, ge=1, le=4096, description=f"Tokens per KV block; default: {DEFAULT_BLOCK_SIZE}, or for DeepSeek-V4 the "
        "least common multiple of its compress rates (16 for the tiny preset, 128 for V4-Flash), so that every block "
        "boundary closes every compression window. An explicit size must be a multiple of it."
    )
    num_device_blocks: int | None = Field(
        None, ge=1, description="Device KV blocks; default: from device_memory_fraction (GPU) or cpu_kv_bytes (CPU)."
    )
    device_memory_fraction: float = Field(0.85, gt=0, le=1, description="GPU memory share for weights + KV.")
    cpu_kv_bytes: ByteSize = Field(1 << 30, ge=1, description="KV cache bytes when the model runs on the CPU.")
    enable_prefix_caching: bool = Field(True, description="Name full blocks by their prefix hash so later requests share them.")

    def resolved_block_size(self, multiple_of: int = 1) -> int:
        """The block size a model whose blocks must hold whole `multiple_of`-token pieces uses:
        the configured one (checked) or the default (64 for dense models: multiple_of 1)."""
        if self.block_size is None:
            return DEFAULT_BLOCK_SIZE if multiple_of == 1 else multiple_of
        if self.block_size % multiple_of:
            raise ConfigError(f"cache.block_size {self.block_size} must be a multiple of {multiple_of} for this model "
                              f"(its compression windows), e.g. {multiple_of}, {2 * multiple_of} or {4 * multiple_of}")
        return self.block_size


class SchedulerSettings(_Frozen):
    """Continuous batching with chunked prefill under a per-step token budget."""

    max_num_seqs: int = Field(256, ge=1, description="Most sequences running at once.")
    # Two budgets: a step that carries decodes stays small, so a long prefill delays everyone
    # else's next token by one short step (~50 ms for an 8B model at 2048 tokens on an H100-class
    # GPU); a step of prefill alone takes big chunks. At 2048 a 130K-token prompt took 64 steps,
    # TTFT 3.9 s on an H200 against 1.05 s for transformers in one shot, 1.3-1.9 s at 8192
    # (../shared/measurements/longctx_step_sizes-H200.log, before the bucketed cuDNN shapes of
    # model_shards/attention/chunked_prefill.py). 16384 amortises each step's fixed cost (Python,
    # launches, the log-sum-exp merges of the prefix pieces: ~1-2 ms) over ~0.2 s of 8B work and
    # keeps the (tokens, 2 * intermediate) activation under 1 GB; bench/gpu.py --step-sweep
    # measures the attention rate per chunk size.
    max_tokens_per_step: int = Field(
        16384, ge=1, description="Token budget of an engine step: decodes first, then prefill chunks."
    )
    # bench/step_budgets.py on an H100 (session 13, 8B shape, 2 layers, two runs each): at 2048 a
    # 16 x 4K batch prefilled 12 of its prompts over ~24 capped steps (TTFT mean 0.12-0.50 s,
    # 649-1869 tok/s; session 12: 0.42 s, 737, against transformers' 0.21 s, 1253); at 8192 0.10 s
    # and 2190 tok/s, 64 x 1K 3655 against 1846-2926, 8 x 32K 240 against 208. The price: a prompt's
    # chunk stalls the requests decoding beside it longer (8 x 32K TPOT max 30 against 10 ms).
    # 16384 gained 3-9% more throughput for twice the stall.
    max_tokens_per_step_while_decoding: int = Field(
        8192, ge=1, description="While any request is decoding, a step's budget is at most this (decodes included)."
    )
    max_waiting_requests: int = Field(1024, ge=1, description="Queue bound in requests.")
    # Running prefills are scheduled before the queue, so without a share a 1M-token prompt took
    # every step's whole budget and a short request behind it waited for all of it (minutes on
    # a large model). With it, the short one is admitted at the next step; the long prompt runs
    # at this share of the budget only while a shorter request waits, and at full budget
    # otherwise (prompts of equal length keep first come, first served: the lowest mean TTFT).
    prefill_share_while_waiting: float = Field(
        0.5, gt=0, le=1, description="While a request with less to compute than a running prompt waits to be "
        "admitted, the running prompts' prefill chunks take at most this share of a step's budget (1: no share).")
    # A step's host work after the device answers (detokenizing, stop strings, the deltas and their
    # delivery: ~14 us a request, ~0.9 ms at 64 requests on an H100 host, docs/benchmarks.md) runs
    # while the next step computes (engine/overlapped_work.py); the checks without text (stop token,
    # length) still end a sequence before the next step is scheduled, and a first token is made
    # and delivered at once (TTFT). A stop string is found one step late: the next step computes
    # one more token for that sequence, which is dropped.
    overlap_outputs: bool = Field(
        True, description="Make and deliver a step's text while the next step runs on the device (serving "
        "loops); a stop string then costs one dropped token of compute.")


class ParallelSettings(_Frozen):
    """How one replica's model is split over ranks (GPUs); see docs/parallelism.md."""

    tensor_parallel_size: int = Field(1, ge=1, description="Ranks that split the heads, MLP and vocabulary.")
    sequence_parallel_size: int = Field(
        1, ge=1, description="Ranks that split prompts. Dense models: ring attention, every KV block striped by "
        "position; DeepSeek-V4: a long chunk's queries split, each rank a replica of the (compressed) state."
    )
    # One all-gather a layer of the chunk's KV-side rows, ~30 us of NVLink latency at these sizes,
    # against a layer's work on 1K tokens of ~1 ms: below that the collectives eat the gain
    # (an estimate, not yet measured on the GPU).
    sequence_split_min_tokens: int = Field(
        1024, ge=1, description="DeepSeek-V4 with sequence_parallel_size > 1: a prefill chunk is split over the SP "
        "ranks when each gets at least this many of its tokens; shorter chunks and decodes run whole on every rank."
    )

    # auto keeps each entry point's natural host: `longctx generate` and engines built in a script
    # run their ranks locally (no Ray to start), a Serve replica places TP x SP ranks as Ray actors
    # in its placement group (GPUs reserved by Serve, ranks placeable on other nodes) and keeps one
    # rank in its own process (no per-step trip to an actor).
    executor: Literal["auto", "local", "ray"] = Field(
        "auto", description="Where the ranks run. local: one rank in the engine's process, TP x SP ranks in one "
        "local process each; ray: one Ray actor per rank in the Serve replica's placement group; auto: ray for TP "
        "x SP ranks inside a Ray actor (a Serve replica), local otherwise (one rank always local; executors/)."
    )

    # TP all-reduces every layer (NVLink-bound), the SP ring passes KV blocks once per chunk and
    # hides them behind attention: only SP traffic can afford to leave a node.
    span_nodes: bool = Field(
        False, description="Ray executor only. false: the replica and all its ranks on one node (STRICT_PACK); "
        "true: each SP rank's TP group on one node (one placement bundle per TP group), the SP groups packed "
        "onto as few nodes as hold them (PACK), so TP stays inside a node and SP crosses nodes."
    )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.sequence_parallel_size


class ServeSettings(_Frozen):
    """The HTTP API on Ray Serve: replicas, admission bounds, timeouts, auth and routing.

    Ray Serve's own defaults are sized for short requests (5 ongoing requests a replica, no
    admission bound in tokens); deployments/app.py derives the Serve options from these.
    """

    model_name: str = Field("", description="Model id in /v1/models and responses; default: the folder's name.")
    num_replicas: int = Field(1, ge=1, description="LLM server replicas; each owns one engine and its workers.")
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas (tokenize, route, stream).")
    ingress_num_cpus: float = Field(1.0, ge=0, description="Logical CPUs an ingress replica reserves.")
    # Each hop between Serve replicas costs a routed call per request and a Ray message per
    # streamed chunk; with one LLM server replica the ingress has nothing to route.
    ingress_in_replica: bool = Field(
        True, description="With at most one LLM server replica and one ingress replica, the LLM server replica "
        "serves HTTP itself (the proxy streams straight from it: one hop fewer per request and per chunk); "
        "false: always a separate OpenAIIngress deployment."
    )
    # Serve's proxy costs a routed Ray call per request and a Ray message per streamed chunk:
    # session 6 (CPU machine) 26 -> 10 ms TTFT at one stream, 1.6x the tokens/s at 16 without it.
    direct_ingress: bool = Field(
        True, description="On an embedded Ray (`longctx serve` without RAY_ADDRESS) whose one LLM server replica "
        "serves HTTP itself: that replica listens on the HTTP port directly (Ray Serve's direct ingress) and "
        "Serve's proxy moves to a free port; false: through the proxy. A cluster's pods set it in their "
        "environment instead (docs/serving.md)."
    )
    worker_num_cpus: float = Field(1.0, gt=0, description="Logical CPUs each model worker reserves.")
    accelerator_type: str | None = Field(
        None, description="GPU model every model worker needs, as Ray names it (H100, H200, A100...: the node "
        "resource `accelerator_type:<name>`); None: any GPU."
    )
    # Each stream chunk costs the replica and the proxy ~0.4 ms of Python (H200 host, session 5):
    # at 64 streams, one chunk per step each took more time than the step itself.
    stream_chunks_per_s: float = Field(
        500.0, ge=0, description="Per replica: most stream chunks a second over all its streams. Under load "
        "each stream sends every (streams / this) seconds all the tokens made meanwhile; its first token and "
        "its end at once. 0: one chunk per engine step and stream."
    )
    # A burst of requests reaches an idle engine one parsed body at a time (1-8 ms apart on the CPU
    # machine): started at the first, it prefills that one alone and the rest at the decode-capped
    # budget over several steps (session 10 traced the 37-53% tok/s that HTTP lost at 16 and 64
    # streams on the H200 to this). A fixed gap would add 4 ms to a lone request's TTFT (a third of
    # 12 ms for a 4K prompt), so the engine waits only when requests come together
    # (engine/async_engine.py `_arrivals_look_bursty`): lone requests never wait. Measured on an
    # H100 (session 12, 5 alternating runs of each setting in one process): no gain at 16 or 64
    # streams, direct or through HTTP (TTFT +3 to +13% with the gap, tok/s within 2%), so it is off
    # by default; the mechanism stays for hosts where bodies arrive further apart.
    arrival_gap_s: float = Field(
        0.0, ge=0, description="Per replica: an idle engine given a request while requests come together "
        "(several requests open now, or at a step that ended less than 5 gaps ago) waits for more while they keep "
        "arriving, until none has come for this long (at most arrival_max_wait_s), so that a burst is prefilled "
        "in one step; a lone request after a quiet period starts at once. 0: the first step never waits."
    )
    arrival_max_wait_s: float = Field(
        0.05, ge=0, description="Per replica: the longest an idle engine waits for a burst's requests (arrival_gap_s)."
    )
    # The replica's HTTP/SSE Python and the engine loop share one GIL on a thread: under load (16-64
    # streams) served throughput was 31-44% below the engine driven directly. vLLM v1 runs the
    # engine core in its own process for the same reason. Measured on an H100 (sessions 13 and 14,
    # 8B shape, 32K shared prefix): at 64 streams the child process served 3,441 / 3,315 output
    # tok/s against the thread's 2,697 / 2,962 and TTFT 310 / 345 ms against 451 / 568; at 16
    # streams TTFT 125 / 105 ms against 174 / 240, tok/s +12% / -1%. On a CPU the step's torch ops
    # use every core already, and a child costs a second interpreter's start: auto keeps a thread.
    engine_loop: Literal["auto", "thread", "process"] = Field(
        "auto", description="Where a replica runs its engine loop. thread: on a thread of the replica "
        "process, sharing the GIL with the HTTP server and the streams. process: the engine and its model "
        "worker run in a child process (started with spawn); the replica process keeps only HTTP and the "
        "streams, talking to it through a pipe. Not with parallel.executor ray (the child is no Ray worker). "
        "auto: process when the engine runs on a GPU with local ranks, thread otherwise."
    )
    # The engine process's threads beside the step's own (the receiver unpickling requests; the KV
    # tiers' I/O) hold the GIL in turns; the step's thread, back from each
    # CUDA call, waits until the holder lets go, up to the interpreter's switch interval (5 ms by
    # default). bench/step_anatomy.py on an H100 with the Redis tier writing (session 15): a lone
    # 33K prompt's step 9.7 ms at 5 ms, 6.1 at 0.5 ms, 5.4 at 0.1 ms; 4.3 with nothing writing.
    engine_switch_interval_s: float = Field(
        0.0005, gt=0, le=0.1, description="With engine_loop process: the engine process's GIL switch interval "
        "(sys.setswitchinterval): how long its step thread may wait for another of its threads to let go of the "
        "GIL. Python's default is 0.005."
    )
    max_queued_requests: int = Field(
        256, ge=1, description="Per replica: admitted requests still waiting for their first token; more get 429."
    )
    max_queued_tokens: int = Field(
        4 * 1024 * 1024, ge=1, description="Per replica: prompt tokens of those requests; more get 429."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After header of a 429.")
    # Each choice is one sequence in the engine's queue and one object in the ingress, made before
    # the first token: an unbounded n let one request exhaust both.
    max_n: int = Field(16, ge=1, description="Most choices one request may ask for (n, best_of); more get 400.")
    default_chat_max_tokens: int = Field(
        4096, ge=1, description="max_tokens of a chat request that gives none (lowered to the room its context "
        "and the KV cache leave); without it a chat runs to the end of a million-token context."
    )
    # A million-token prefill takes minutes; the per-request deadline, not Serve's proxy, bounds it.
    request_timeout_s: float = Field(3600.0, gt=0, description="Deadline of one request, queueing included.")
    # 1M tokens are ~4 MB of text or ~7 MB as a JSON list of token ids.
    max_request_body_bytes: ByteSize = Field(64 * 1024 * 1024, ge=1024, description="Larger bodies get 413.")
    stall_timeout_s: float = Field(
        300.0, gt=0, description="A step running longer than this while requests wait marks the replica unhealthy."
    )
    health_check_period_s: float = Field(10.0, gt=0, description="How often Serve calls a replica's health check.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A health check slower than this fails the replica.")
    drain_timeout_s: float = Field(60.0, ge=0, description="Shutdown waits this long for requests in flight.")
    api_key: str | None = Field(None, description="Require `Authorization: Bearer <key>` on /v1/*.")
    api_key_file: str | None = Field(
        None, description="API keys from this file (a mounted secret), one a line: `<key>`, or `<tenant> <key>` "
        "(several keys may name one tenant). Each tenant's prompts get their own cache namespace; a key "
        "without a tenant is a tenant of its own (deployments/tenants.py)."
    )
    tenants_share_cache: bool = Field(
        False, description="With API keys: put every tenant in one cache namespace (more prefix hits across "
        "keys); cached_tokens is then reported as 0, since a hit may be on another tenant's prompt."
    )
    routing_block_tokens: int = Field(
        256, ge=1, description="Granularity of the router's prefix-affinity hashes, in tokens."
    )
    routing_max_tracked_blocks: int = Field(
        262_144, ge=1, description="Prefix hashes the router remembers (LRU); ~200 bytes each."
    )
    routing_stats_period_s: float = Field(1.0, gt=0, description="How often replicas report their load.")
    # A replica prefills in arrival order, so a short request routed behind a long prompt waits for
    # all of it; a long prompt can wait its own prefill time and still meet a TTFT that scales with
    # it. docs/autoscaling.md has the simulator's evidence.
    routing_long_prompt_tokens: int = Field(
        32_768, ge=1, description="A prompt computing this many tokens is long: it joins a replica already "
        "queueing this many when the wait there is at most its own prefill, before taking a free replica "
        "(autoscaler/lanes.py).")
    routing_short_lanes: int = Field(
        1, ge=0, description="Replicas with fewer queued prompt tokens than routing_long_prompt_tokens that a "
        "long prompt leaves free for short requests, unless no other replica is left.")
    cluster_grows: bool = Field(
        False, description="The Ray cluster adds nodes on demand (an autoscaler, KubeRay): do not refuse an "
        "application that a one-node cluster cannot hold yet (without it, `serve run` on a small machine fails "
        "at once instead of waiting for ever)."
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json"] = Field(
        "auto", description="How tool calls read in the model's text (tool_choice auto): hermes "
        "(<tool_call>{json}</tool_call>), llama3_json (bare JSON); auto: hermes when the chat template mentions "
        "<tool_call>, else llama3_json."
    )


class KVTierSettings(_Frozen):
    """The KV memory hierarchy below the device cache: host memory, then Redis shared by replicas.

    An evicted device block spills to host memory instead of being dropped; host overflow is
    written back to Redis; a new request restores its longest cached prefix from the tiers when
    that is estimated faster than recomputing it. docs/kv_tiers.md has the design.
    """

    # Redis URLs carry passwords: a validation error must not echo them back.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    host_bytes: ByteSize = Field(
        0, ge=0, description="Host KV memory per worker (pinned on CUDA), LRU; 0 turns the host and Redis tiers off; "
        "left out with redis_urls set: 1GiB (Redis blocks are staged through it)."
    )
    redis_urls: tuple[str, ...] = Field(
        (), description="redis://, rediss://, redis+sentinel:// or redis+cluster:// URLs (password in the URL); "
        "several shard the blocks by hash. protocol/redis_urls.py has the forms."
    )
    redis_password_file: str | None = Field(
        None, description="Read the Redis password from this file (a mounted secret) for URLs that carry none."
    )
    redis_key_prefix: str = Field("longctx", min_length=1, description="First part of every Redis key.")
    redis_namespace: str | None = Field(
        None,
        description="Names the checkpoint in Redis keys; default: a digest of the weight files (read once at start).",
    )
    redis_ttl_s: int | None = Field(
        86_400, ge=1, description="Expiry of each block in Redis; None: until Redis evicts it."
    )
    # On by default: sharing a long document's prefill with every replica is the point of the
    # Redis tier, and a block written only when this replica evicts it may come too late.
    redis_write_through: bool = Field(True, description="Write each newly computed full block to Redis at once.")
    # Shared: anything besides this deployment's own model workers can write to the Redis servers
    # (other applications or teams, another deployment with other weights, any client on a
    # network not closed to all but this cluster). Private: Redis ACLs or the network let only
    # this deployment's workers write. A checksum cannot tell a forged block from a real one.
    redis_shared: bool = Field(
        False, description="Others can write to the Redis servers (see the comment above); then every block "
        "carries an HMAC-SHA256 and redis_mac_key or redis_mac_key_file is required."
    )
    redis_mac_key: str | None = Field(
        None, min_length=16, description="Secret key of the blocks' HMAC-SHA256 (the same on every replica); "
        "with one, a block that does not verify is a counted miss (longctx_kv_unauthentic_blocks)."
    )
    redis_mac_key_file: str | None = Field(None, description="Read redis_mac_key from this file (a mounted secret).")
    redis_socket_timeout_s: float = Field(2.0, gt=0, description="Per Redis command; a slower one counts as an error.")
    redis_max_connections: int = Field(8, ge=1, description="Connections per Redis shard (at least redis_io_threads).")
    # Per shard: one client thread with one connection stops near one core's worth of receive,
    # checksum and copy; more shards must bring more threads for their bandwidth to add up.
    redis_io_threads: int = Field(
        4, ge=1, description="Background threads per Redis shard moving blocks between host and Redis."
    )
    # Redis serves 1-4 MiB values 2-3x faster than 8 MiB ones (bench/kv_tiers.py: redis-benchmark
    # GET 2.55 GB/s at 2 MiB, 0.80 GB/s at 8 MiB on the H200 host), and a Llama-3-8B block of 64
    # tokens is 8 MiB.
    redis_value_part_bytes: ByteSize = Field(
        2 << 20, ge=64 << 10, description="A block value of several times this size is stored as equal parts "
        "of about this size (keys <key>, <key>:1, ...; a missing part is a miss). Readers and writers of one Redis "
        "must agree."
    )
    redis_max_pending_write_bytes: ByteSize = Field(
        1 << 30, ge=0, description="Redis writes queued beyond this are dropped (counted), never waited for."
    )
    redis_retry_backoff_s: float = Field(0.5, gt=0, description="First wait before retrying a failed shard; doubles.")
    redis_retry_backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between retries of a failed shard.")
    redis_health_check_period_s: float = Field(
        5.0, gt=0, description="How often the workers ping Redis and report up / down (longctx_kv_redis_up, "
        "/health), requests or not."
    )
    restore_timeout_s: float = Field(
        2.0, ge=0, description="A new request waits for its Redis prefetch this long beyond twice the estimated "
        "transfer time; blocks not there by then are recomputed."
    )
    restore_policy: Literal["cost", "always", "never"] = Field(
        "cost", description="cost: restore when the estimated restore time beats the estimated recompute time "
        "by restore_margin (kvcache/tiers/cost_model.py); always, never: regardless."
    )
    restore_margin: float = Field(
        0.1, ge=0, description="cost policy: restore only when estimated restore time x (1 + this) is below the "
        "estimated recompute time (a restore also spends Redis bandwidth and host memory, and varies more); "
        "recompute a head while fetching the rest only when that beats restoring the whole run by as much."
    )
    calibration_budget_s: float = Field(
        3.0, ge=0, description="At start-up, time a few prefill steps and host<->device and Redis transfers on "
        "this machine for the cost policy's estimates (logged), for at most about this long; 0: no probe."
    )
    ema_alpha: float = Field(
        0.2, gt=0, le=1, description="Weight of a new measurement in the restore and prefill estimates once many "
        "were seen (the first one nearly replaces the calibration)."
    )
    initial_host_bandwidth_bytes_per_s: float = Field(
        10e9, gt=0, description="Host<->device estimate until calibrated or measured."
    )
    initial_redis_bandwidth_bytes_per_s: float = Field(1e9, gt=0, description="Redis->host estimate until calibrated "
                                                       "or measured.")
    initial_prefill_tokens_per_s: float = Field(
        10_000.0, gt=0, description="Prefill rate estimate (short prompts) until calibrated or measured."
    )
    initial_split_fetch_slowdown: float | None = Field(
        None, gt=0, description="How many times longer a Redis fetch takes while the request's first blocks are "
        "recomputed meanwhile than alone, as measured on this host. None: unknown, and no restore is split (it "
        "varies too much to guess: 1.65 on the H200 host of session 3, 7.08 in session 4). Once set, every split "
        "restore corrects it."
    )
    transfer_chunk_bytes: ByteSize = Field(
        64 << 20, ge=1, description="Device staging per batched host<->device copy (bounds the extra device memory)."
    )
    # Spills happen when allocation evicts a cached block anyway; the watermark moves those
    # copies ahead, out of the step that needs the memory, a few blocks per step.
    spill_watermark_fraction: float = Field(
        0.05, ge=0, le=0.5, description="Keep this fraction of the device blocks, next in eviction order, copied to "
        "host ahead of need, so that evicting them costs no copy; 0: copy at eviction only."
    )
    # A hybrid model's window part (DeepSeek-V4: every layer's raw window K, ~80% of a block's
    # bytes) is needed only where a restore ends; it is kept for every this-many-th block and for
    # the last blocks of each sequence (docs/kv_tiers.md, "DeepSeek-V4").
    window_part_interval_blocks: int = Field(
        16, ge=1, description="Hybrid models (DeepSeek-V4): keep a block's window part in host and Redis for every "
        "this-many-th block and a sequence's last blocks only; a restore ends at the last such block. 1: every block."
    )
    spill_ahead_max_blocks_per_step: int = Field(
        16, ge=1, description="Copies ahead of need per engine step (bounds what one step waits for)."
    )

    @model_validator(mode="before")
    @classmethod
    def _redis_stages_through_host(cls, data: Any) -> Any:
        """Redis without host_bytes: the default staging size (an explicit 0 stays an error)."""
        if isinstance(data, dict) and data.get("redis_urls") and "host_bytes" not in data:
            return {**data, "host_bytes": DEFAULT_REDIS_STAGING_BYTES}
        return data

    @model_validator(mode="after")
    def _redis_needs_host(self) -> "KVTierSettings":
        from protocol.redis_urls import parse_redis_url  # torch- and redis-free

        for url in self.redis_urls:
            parse_redis_url(url)  # a ValueError naming the URL, its password redacted
        if self.redis_urls and self.host_bytes == 0:
            raise ValueError("redis_urls needs host_bytes > 0: Redis blocks are staged through host memory "
                             "(leave host_bytes out for 1GiB)")
        return self

    @model_validator(mode="after")
    def _mac_key_when_shared(self) -> "KVTierSettings":
        if self.redis_mac_key is not None and self.redis_mac_key_file is not None:
            raise ValueError("give redis_mac_key or redis_mac_key_file, not both")
        if self.redis_shared and self.redis_mac_key is None and self.redis_mac_key_file is None:
            raise ValueError("redis_shared needs redis_mac_key or redis_mac_key_file: anyone who can write to a "
                             "shared Redis could forge KV blocks")
        return self


class AutoscalingSettings(_Frozen):
    """Replicas sized by queued context tokens instead of ongoing requests (autoscaler/).

    Two 500K-token prompts are a thousand times the work of two 500-token ones, so the policy
    reads what replicas owe in tokens and seconds of prefill, KV and decode, and sizes the
    deployment by Little's law: enough replicas that the queued prefill drains within
    `ttft_target_s`. docs/autoscaling.md has the model and the simulator's comparison.
    """

    enabled: bool = Field(False, description="Scale the LLM server replicas with this policy; "
                          "off: serve.num_replicas, fixed. On: serve.num_replicas is ignored.")
    # Two: a replica busy with a long prefill blocks every request routed behind it, and a new
    # one starts too late for a burst's first requests; a standing second replica is the lane
    # short requests keep (docs/autoscaling.md has the simulator's evidence).
    min_replicas: int = Field(2, ge=0, description="Fewest replicas; 0 lets Serve scale to zero (cold starts).")
    max_replicas: int = Field(4, ge=1, description="Most replicas; each reserves its GPUs (KubeRay adds nodes).")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time; default: min_replicas.")
    # 120 s: a replica added for queued prefill serves only the requests routed after it is up
    # (the queued ones are bound to their replica), so a tighter horizon buys replicas that idle;
    # the simulator's sweep (docs/autoscaling.md) found 120 s cheaper than 60 or 30 s.
    ttft_target_s: float = Field(
        120.0, gt=0, description="Little's law horizon: enough replicas that the queued prefill (net of prefix "
        "hits) drains within this many seconds, i.e. ceil(queued prefill seconds / ttft_target_s).")
    interactive_ttft_s: float = Field(
        2.0, gt=0, description="A replica owing more prefill than this many seconds is busy: a short request "
        "routed to it would wait behind a long prompt.")
    spare_replicas: int = Field(
        2, ge=0, description="Replicas kept free of long prefills (below interactive_ttft_s of backlog) while "
        "any replica is busy: a lane for short requests, since one prompt cannot be split over replicas.")
    prefill_tokens_per_s: float | None = Field(
        None, gt=0, description="Prefill rate of one replica; None: each replica's own estimate, measured while "
        "serving (in FLOPs, so a 1M-token prompt's quadratic attention is priced in).")
    kv_target_utilization: float = Field(
        0.9, gt=0, le=1, description="Running KV tokens per replica at most this share of its KV capacity.")
    decode_sequences_per_replica: int = Field(
        128, ge=1, description="Decoding sequences one replica should carry (the decode load target).")
    downscale_headroom: float = Field(
        0.8, gt=0, le=1, description="Hysteresis: scale down to m replicas only when the load fits m at this "
        "share of their targets, so a load at the boundary does not flap.")
    # 0: the start-up time alone (the ski-rental rule). Session 3's 120 s made up for the router
    # of then, which spent the warm replicas on a burst's first documents; with the router's lanes
    # (serve.routing_short_lanes) the simulator's sweep finds the start-up time cheaper at the
    # same attainment (docs/autoscaling.md).
    downscale_delay_s: float = Field(
        0.0, ge=0, description="The load must stay low this long before replicas are removed, and at least "
        "replica_startup_s: a replica is released only after idling as long as a new one takes to start.")
    replica_startup_s: float = Field(
        30.0, ge=0, description="Scale-up to serving: placement (KubeRay may add a GPU node), model load, warm-up.")
    long_request_tokens: int = Field(
        32_768, ge=1, description="No downscale while any replica holds a request this long (prompt + output): "
        "Serve, not the policy, picks the replica to stop, and a long request may outlast serve.drain_timeout_s.")
    # Serve's default push interval (10 s) hides a burst shorter than that and delays every
    # scale-up by up to 10 s. One push a second per replica is one small RPC to the controller:
    # negligible at hundreds of replicas, and well below a replica's start-up time.
    metrics_push_interval_s: float = Field(
        1.0, gt=0, description="How often each replica reports its autoscaling stats to Serve's controller.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError("initial_replicas must be between min_replicas and max_replicas")
        return self

    @property
    def effective_downscale_delay_s(self) -> float:
        return max(self.downscale_delay_s, self.replica_startup_s)


class LongctxConfig(_Frozen):
    model: ModelSettings = ModelSettings()
    cache: CacheSettings = CacheSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    parallel: ParallelSettings = ParallelSettings()
    serve: ServeSettings = ServeSettings()
    kv_tiers: KVTierSettings = KVTierSettings()
    autoscaling: AutoscalingSettings = AutoscalingSettings()

    @property
    def max_llm_replicas(self) -> int:
        """LLM server replicas there may be at once (what Ray must have room for)."""
        return self.autoscaling.max_replicas if self.autoscaling.enabled else self.serve.num_replicas

    @property
    def serves_http_from_llm_server(self) -> bool:
        """serve.ingress_in_replica where it applies: one LLM server replica, one ingress replica."""
        return self.serve.ingress_in_replica and self.max_llm_replicas == 1 and self.serve.ingress_replicas == 1

    @model_validator(mode="after")
    def _budget_covers_decodes(self) -> "LongctxConfig":
        if self.scheduler.max_tokens_per_step < 1:
            raise ValueError("scheduler.max_tokens_per_step must be >= 1")
        if (self.cache.block_size or DEFAULT_BLOCK_SIZE) % self.parallel.sequence_parallel_size:
            # each SP rank holds block_size / sp positions of every block
            raise ValueError("cache.block_size must be divisible by parallel.sequence_parallel_size")
        return self

    @model_validator(mode="after")
    def _engine_process_runs_local_ranks(self) -> "LongctxConfig":
        if self.serve.engine_loop == "process" and self.parallel.executor == "ray":
            raise ValueError("serve.engine_loop process needs parallel.executor local or auto: the engine's "
                             "child process is no Ray worker and cannot place rank actors")
        return self

    def for_model(self, block_multiple: int = 1) -> "LongctxConfig":
        """This config with `cache.block_size` resolved for a model whose blocks must hold whole
        `block_multiple`-token pieces (CacheSettings.resolved_block_size): made once, at engine
        start, and handed to every part from there."""
        block_size = self.cache.resolved_block_size(block_multiple)
        if block_size == self.cache.block_size:
            return self
        return self.model_copy(update={"cache": self.cache.model_copy(update={"block_size": block_size})})

    def with_overrides(self, overrides: dict[str, Any]) -> "LongctxConfig":
        """A new config with dotted keys replaced: {"cache.block_size": 16}. None values are skipped."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, key = dotted.partition(".")
            if section not in data or key not in data[section]:
                raise ConfigError(f"unknown config key {dotted!r}")
            data[section][key] = value
        return load_config_dict(data)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def load_config_dict(data: dict[str, Any]) -> LongctxConfig:
    try:
        return LongctxConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"config key {key!r}: {first['msg']}") from None


def load_config(path: str | Path | None) -> LongctxConfig:
    """Read a YAML config file; no file means all defaults."""
    if path is None:
        return LongctxConfig()
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return load_config_dict(data)
