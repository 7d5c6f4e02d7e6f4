"""DeepSeek-V4 (transformers' DeepseekV4ForCausalLM), exact against its full forward.

    model.py            the causal LM over explicit per-request state (chunks of one or several sequences)
    state.py            that state: sliding window, compressed entries, open windows, overlaps
    entries.py          where entries lie (one tensor, or pages through a block table) and how they are read
    attention.py        one attention layer: projections, RoPE, state update, grouped output
    sink_attention.py   the attention core over window + compressed keys with per-head sinks
    decode_attention.py that core for many single-query segments (a decode step) in one padded batch
    sink_softmax.py     its softmax as one Triton kernel (GPU)
    compressor.py       gated pooling of every m tokens into one entry (CSA overlapping, HCA not)
    indexer.py          the Lightning Indexer's top-k choice of compressed entries (CSA)
    index_scores.py     its scores: torch reference, and a fused Triton kernel (+ _kernel.py)
    positions.py        a step's token and entry positions, built on the host, copied without a wait
    rope.py             partial, interleaved RoPE ("main" and "compress", YaRN on the latter)
    norm_rope.py        RMS norm + RoPE of q / kv / output as one Triton kernel (+ _kernel.py)
    hyper_connections.py  mHC: Sinkhorn-mixed residual streams and the hyper head
    hyper_kernels.py    mHC as four Triton kernels (GPU)
    moe.py              sqrtsoftplus top-k and hash routing, routed and shared experts (EP)
    grouped_experts.py  routed experts as grouped matmuls over tokens sorted by expert, no host sync
    weights.py          checkpoint names, DeepSeek's and transformers' spellings
    runner.py           the engine's steps on this model, per request: tokens, block tables, open windows
    kv_pages.py         the paged cache: compressed and window page pools (byte layouts, sizes)
    paged_state.py      a request's state over its pages (entries read in place), written through by sinks
    kv_tiers.py         host / Redis slots of block i of both pools
    worker.py           the rank's worker: model, pages, runner, tier transfers
    presets.py          `longctx make-model --preset deepseek-v4-tiny | deepseek-v4-flash-shape`
The config reader and the KV budget live in model_folder/ (the driver reads them too).
"""
