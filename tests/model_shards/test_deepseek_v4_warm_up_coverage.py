"""After the worker's kernel warm-up, serving compiles nothing: every Triton launch of later
requests (other prompt lengths, chunk sizes, several requests decoding, one finishing) has a
specialization key the warm-up already launched (model_shards/triton_compiles.py).

On a CPU the kernels run in Triton's interpreter: the test switches each GPU path on (the
`is_cuda` gates), with a float16 model (the interpreter's bf16 dots are wrong: interpreter_numerics.py).
The tiny preset's rates (CSA 4, HCA 16) and 16-token blocks stand in for the flash shape's, and its
first three layers for all of the flash shape's: each attention kind (sliding, CSA, HCA) and each
MLP kind (hash MoE, MoE) once. A layer's launch keys follow from its kind and the step, not from
its index: the preset's fourth layer (CSA again) repeated the second's keys (the warm-up's and the
serving's key sets with four layers and with three were equal) at a sixth of the test's time.
"""

from __future__ import annotations

import pytest
import torch

from model_folder.deepseek_v4_config import CSA, HASH_MOE, HCA, LAYER_TYPES, MLP_LAYER_TYPES, MOE, SLIDING
from model_shards.deepseek_v4 import chunk_cores, hyper_connections, index_scores, norm_rope, paged_decodes, sink_attention
from model_shards.deepseek_v4.chunk_attention_kernel import _chunk_attention
from model_shards.deepseek_v4.hyper_kernels import _collapse, _hyper_weights, _mix, _stream_mixes
from model_shards.deepseek_v4.index_scores_kernel import _decode_index_scores, _index_scores
from model_shards.deepseek_v4.kernel_choices import KernelChoices
from model_shards.deepseek_v4.kernel_warmup import warm_up_runner
from model_shards.deepseek_v4.kv_pages import PagePool, compressed_layout, window_layout
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.norm_rope_kernel import _norm_rope
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.runner import DeepseekV4Runner
from model_shards.deepseek_v4.sink_softmax import _sink_softmax
from model_shards.triton_compiles import LaunchKeys
from protocol.sampling_params import SamplingParams
from protocol.step import CachedRequestData, NewRequestData, StepInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KERNELS = (_index_scores, _decode_index_scores, _sink_softmax, _norm_rope, _stream_mixes, _hyper_weights,
           _collapse, _mix, _chunk_attention)  # the worker's defaults (chunk attention auto: CSA fused on a GPU)
BLOCK, CHUNK = 16, 32
LAYERS = 3  # [sliding, CSA, HCA] x [hash MoE, MoE, MoE]: every kind once
GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
# Smaller than the preset where only the interpreter's time depends on it: the sink softmax runs a
# program per token and head, and each hyper-connection program loops over the Sinkhorn
# iterations. Both are integer arguments of the same launch-key class at 2 / 3 as at the preset's
# 4 / 20 (neither 1 nor a multiple of 16): the warm-up's and the serving's key sets were equal, key
# for key, to the preset's, at 91 s instead of 122 s on 2 cores.
INTERPRETER_SIZED = {"num_attention_heads": 2, "hc_sinkhorn_iters": 3}


def gpu_paths_on_the_cpu(monkeypatch) -> None:
    def half(q, keys_dtype):
        return q.dtype == torch.float16 and keys_dtype == q.dtype

    monkeypatch.setattr(index_scores, "fused_kernel_runs", half)
    monkeypatch.setattr(paged_decodes, "fused_kernel_runs", half)
    monkeypatch.setattr(sink_attention, "attend", sink_attention.attend_fused)
    monkeypatch.setattr(norm_rope, "fused_kernel_runs", lambda x: x.is_contiguous())
    monkeypatch.setattr(hyper_connections, "fused_kernels_run", lambda streams: streams.is_contiguous())
    csa = lambda core, q, compressed: core in ("fused", "auto") and compressed is not None \
        and compressed.selected is not None  # noqa: E731  (auto as on a GPU)
    monkeypatch.setattr(chunk_cores, "_fused_wanted", csa)


def serving_steps(lengths: list[int], decodes: int) -> list[StepInput]:
    """Prompts of `lengths` prefilled in CHUNK-token steps side by side, then `decodes` steps of all
    of them decoding, the first finishing half way. Blocks: each request its own run of ids."""
    per_request = -(-(max(lengths) + decodes) // BLOCK)
    ids = [f"r{i}" for i in range(len(lengths))]
    tables = [tuple(range(i * per_request, (i + 1) * per_request)) for i in range(len(lengths))]
    new = [NewRequestData(rid, tuple(range(7, 7 + n)), (), GREEDY, (table, table), 0)
           for rid, n, table in zip(ids, lengths, tables)]
    done, steps = [0] * len(lengths), []
    while any(d < n for d, n in zip(done, lengths)):
        scheduled = {rid: min(CHUNK, n - d) for rid, n, d in zip(ids, lengths, done) if d < n}
        steps.append(StepInput(len(steps), new_requests=tuple(new) if not steps else (),
                               cached_requests=tuple(CachedRequestData(rid, ((), ()), done[i]) for i, rid in
                                                     enumerate(ids) if steps and rid in scheduled),
                               num_scheduled_tokens=scheduled))
        done = [d + scheduled.get(rid, 0) for rid, d in zip(ids, done)]
    for step in range(decodes):
        live = ids[1:] if step >= decodes // 2 else ids
        steps.append(StepInput(len(steps), cached_requests=tuple(
            CachedRequestData(rid, ((), ()), done[ids.index(rid)] + step) for rid in live),
            num_scheduled_tokens=dict.fromkeys(live, 1),
            finished_request_ids=frozenset(ids[:1]) if step == decodes // 2 else frozenset()))
    return steps


def test_requests_after_the_warm_up_launch_only_warmed_keys(tmp_path, monkeypatch):
    """The worker's defaults (the threshold top-k's kernels keep one key whatever the row width:
    test_deepseek_v4_threshold_top_k.py; a second run here would cost two minutes of interpreter)."""
    kernels, watched = KernelChoices("auto"), KERNELS
    gpu_paths_on_the_cpu(monkeypatch)
    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=6, layers=LAYERS, **INTERPRETER_SIZED)
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float16, kernels=kernels)
    assert model.arch.layer_types == (SLIDING, CSA, HCA) and set(LAYER_TYPES) == {SLIDING, CSA, HCA}
    assert set(model.arch.mlp_layer_types) == {HASH_MOE, MOE} == set(MLP_LAYER_TYPES)
    pages = PagedKV(PagePool(compressed_layout(model.arch, BLOCK, model.dtype), 64, "cpu"),
                    PagePool(window_layout(model.arch, BLOCK, model.dtype), 64, "cpu"), BLOCK)
    runner = DeepseekV4Runner(model, pages)
    with LaunchKeys(*watched) as warm:
        assert warm_up_runner(runner) > 0
    with LaunchKeys(*watched) as served:
        for step in serving_steps([32, 90], decodes=8):  # steps of 64, 32, 26 tokens, then decodes
            runner.execute(step)
    for kernel in watched:
        assert served.keys[kernel], f"{kernel.fn.__name__}: never launched while serving"
        unwarmed = set(served.keys[kernel]) - set(warm.keys[kernel])
        assert not unwarmed, f"{kernel.fn.__name__} compiles while serving: {sorted(unwarmed, key=str)[:2]}"
