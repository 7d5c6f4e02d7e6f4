"""Compile V4's Triton kernels when the worker starts, not in its first requests.

A Triton kernel compiles at its first launch with each specialization key (0.3-1 s of host time
each on the H200, a dozen kernels). Lengths no longer select a variant (index_scores_kernel.py,
sink_softmax.py, ...); what still does is the path a step takes and a few divisibilities fixed by
whole chunks: a chunk of more than 16 tokens or of at most 16 (the indexer's two tile heights),
entry counts at a chunk's end that are multiples of 16 or not (the softmax's key counts), several
requests decoding together (the batched decode kernels). One synthetic prompt in chunks chosen to
take each of those, then steps of a short request decoding alone and of both decoding together.
`warm_up_runner` runs them as engine steps through the runner on the pages (the serving path:
the worker calls it before it serves anything, so the blocks it writes hold nothing yet and the
requests are dropped after). Every TP rank runs the same steps, so their collectives pair up.
"""

from __future__ import annotations

import logging

import torch

from model_folder.deepseek_v4_config import CSA, HCA
from model_shards.deepseek_v4.kept_weights import GroupedProjection, Projection
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.moe import LocalExperts
from model_shards.deepseek_v4.quantized_experts import QuantizedExperts
from model_shards.deepseek_v4.quantized_linear import DECODE_ROWS, QuantizedWeight, linear
from model_shards.deepseek_v4.runner import DeepseekV4Runner
from protocol.sampling_params import SamplingParams
from protocol.step import CachedRequestData, NewRequestData, StepInput

DECODE_STEPS = 17  # decode widths pass a multiple of 16 and a non-multiple
# One row count per tiling of the kept-quantized matmul (quantized_linear.default_tiling): 16-,
# 32- and 64-row decode tiles, then prefill tiles. The row count itself is not specialized.
QUANTIZED_ROW_LADDER = (1, 17, 33, DECODE_ROWS + 1)
SHORT_PROMPT = 3  # the request that decodes alone first: its key counts cross 16
WARM_UP_IDS = ("warm-up-long", "warm-up-short")
logger = logging.getLogger(__name__)


def warm_up_chunks(csa_rate: int, hca_rate: int) -> list[int]:
    """Chunk lengths of the warm-up prompt: CSA entries at the first chunk's end not a multiple of
    16 (and more than 16 tokens); 16 HCA entries at the second's; a chunk of 5 tokens (the
    indexer's short tile); 17 HCA entries at the fourth's end."""
    first = max(17 * csa_rate, 17)
    ends = [first, max(16 * hca_rate, first + 17), 0, max(17 * hca_rate, 16 * hca_rate + 17)]
    ends[2] = ends[1] + 5
    return [stop - start for start, stop in zip([0, *ends], ends)]


def warm_up_runner(runner: DeepseekV4Runner) -> int:
    """The same steps as engine steps on the pages, block ids from 0; returns the steps run (0:
    pools too small to hold the warm-up's blocks, so the first requests compile instead)."""
    steps = warm_up_steps(runner.model.arch.compress_rate(CSA), runner.model.arch.compress_rate(HCA),
                          runner.pages.block_size)
    needed = 1 + max(block for step in steps for new in step.new_requests for table in new.block_ids
                     for block in table)
    if min(runner.pages.compressed.num_blocks, runner.pages.window.num_blocks) < needed:
        logger.warning("kernel warm-up skipped: the KV pools hold fewer than its %d blocks", needed)
        return 0
    for step in steps:
        runner.execute(step)
    warm_up_quantized_linears(runner.model)
    return len(steps)


def kept_weights(model: DeepseekV4ForCausalLM) -> list[QuantizedWeight]:
    """The weights the model multiplies kept quantized on a GPU (model.quantized_weights: keep),
    one per distinct shape and format."""
    found: dict[tuple, QuantizedWeight] = {}
    for module in model.modules():
        if isinstance(module, GroupedProjection):
            weights = module.quantized_groups
        else:
            weights = [module.quantized] if isinstance(module, Projection) and module.quantized is not None else []
        for weight in weights:
            found.setdefault((type(weight), weight.out_features, weight.in_features, weight.scale_ue8m0), weight)
    return list(found.values())


@torch.inference_mode()
def warm_up_quantized_linears(model: DeepseekV4ForCausalLM) -> int:
    """Each kept weight at each row count of the ladder (a decode batch wider than the warm-up's
    requests picks another tiling); returns the products run."""
    weights, stacks = kept_weights(model), kept_expert_stacks(model)
    for weight in weights:
        for rows in QUANTIZED_ROW_LADDER:
            linear(torch.zeros(rows, weight.in_features, dtype=model.dtype, device=model.device), weight)
    for stack in stacks:  # the grouped kernel's tiling follows the rows per expert
        for per_expert in QUANTIZED_ROW_LADDER:
            offsets = torch.arange(1, stack.num_experts + 1, dtype=torch.int32, device=model.device) * per_expert
            rows = torch.zeros(stack.num_experts * per_expert, stack.expert(0).in_features, dtype=model.dtype,
                               device=model.device)
            stack.grouped_linear(rows, offsets)
    return (len(weights) + len(stacks)) * len(QUANTIZED_ROW_LADDER)


def kept_expert_stacks(model: DeepseekV4ForCausalLM) -> list[QuantizedExperts]:
    """The routed experts' kept stacks, one per distinct shape and format."""
    found: dict[tuple, QuantizedExperts] = {}
    for module in model.modules():
        for kept in module.kept.values() if isinstance(module, LocalExperts) else ():
            for stack in kept.parts:
                first = stack.expert(0)
                found.setdefault((type(first), stack.num_experts, first.out_features, first.in_features,
                                  first.scale_ue8m0), stack)
    return list(found.values())


def warm_up_steps(csa_rate: int, hca_rate: int, block_size: int) -> list[StepInput]:
    """The long prompt chunk by chunk (the short one's prompt beside its last chunk), the short one
    decoding alone, both decoding together, then both finished. Blocks: the long request's first,
    the short one's after them, the same ids in both pools."""
    chunks = warm_up_chunks(csa_rate, hca_rate)
    long_id, short_id = WARM_UP_IDS
    long_tokens = sum(chunks) + 2 * DECODE_STEPS
    long_blocks = tuple(range(-(-long_tokens // block_size)))
    first_short = len(long_blocks)
    short_blocks = tuple(range(first_short, first_short + -(-(SHORT_PROMPT + 2 * DECODE_STEPS) // block_size)))
    greedy = SamplingParams(max_tokens=2 * DECODE_STEPS + 1, temperature=0.0, ignore_eos=True)
    new_long = NewRequestData(long_id, (1,) * sum(chunks), (), greedy, (long_blocks, long_blocks), 0)
    new_short = NewRequestData(short_id, (1,) * SHORT_PROMPT, (), greedy, (short_blocks, short_blocks), 0)
    steps, done = [StepInput(0, new_requests=(new_long,), num_scheduled_tokens={long_id: chunks[0]})], chunks[0]
    for length in chunks[1:]:
        new = (new_short,) if length == chunks[-1] else ()
        scheduled = {long_id: length, **({short_id: SHORT_PROMPT} if new else {})}
        steps.append(StepInput(len(steps), new_requests=new, cached_requests=(_cached(long_id, done),),
                               num_scheduled_tokens=scheduled))
        done += length
    for decoded in range(DECODE_STEPS):
        steps.append(StepInput(len(steps), cached_requests=(_cached(short_id, SHORT_PROMPT + decoded),),
                               num_scheduled_tokens={short_id: 1}))
    for decoded in range(DECODE_STEPS):
        cached = (_cached(long_id, done + decoded), _cached(short_id, SHORT_PROMPT + DECODE_STEPS + decoded))
        steps.append(StepInput(len(steps), cached_requests=cached, num_scheduled_tokens={long_id: 1, short_id: 1}))
    steps.append(StepInput(len(steps), finished_request_ids=frozenset(WARM_UP_IDS)))
    return steps


def _cached(request_id: str, computed: int) -> CachedRequestData:
    return CachedRequestData(request_id, ((), ()), computed)
