"""Compile V4's Triton kernels when the worker starts, not in its first requests.

A Triton kernel compiles at its first launch with each specialization key (0.3-1 s of host time
each on the H200, a dozen kernels). Lengths no longer select a variant (index_scores_kernel.py,
sink_softmax.py, ...); what still does is the path a step takes and a few divisibilities fixed by
whole chunks: a chunk of more than 16 tokens or of at most 16 (the indexer's two tile heights),
entry counts at a chunk's end that are multiples of 16 or not (the softmax's key counts), several
requests decoding together (the batched decode kernels). One synthetic prompt in chunks chosen to
take each of those, then a few steps of two requests decoding together, on in-memory states that
are dropped after: nothing is written to the KV pages, and every TP rank runs the same steps, so
their collectives pair up.
"""

from __future__ import annotations

import torch

from model_folder.deepseek_v4_config import CSA, HCA
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM

DECODE_STEPS = 17  # decode widths pass a multiple of 16 and a non-multiple


def warm_up_chunks(csa_rate: int, hca_rate: int) -> list[int]:
    """Chunk lengths of the warm-up prompt: CSA entries at the first chunk's end not a multiple of
    16 (and more than 16 tokens); 16 HCA entries at the second's; a chunk of 5 tokens (the
    indexer's short tile); 17 HCA entries at the fourth's end."""
    first = max(17 * csa_rate, 17)
    ends = [first, max(16 * hca_rate, first + 17), 0, max(17 * hca_rate, 16 * hca_rate + 17)]
    ends[2] = ends[1] + 5
    return [stop - start for start, stop in zip([0, *ends], ends)]


@torch.inference_mode()
def warm_up_kernels(model: DeepseekV4ForCausalLM) -> int:
    """Run the warm-up prompt and decode steps through `model`; returns the tokens it ran."""
    arch = model.arch
    chunks = warm_up_chunks(arch.compress_rate(CSA), arch.compress_rate(HCA))
    prompt, other = model.new_state(), model.new_state()
    token = torch.ones(1, dtype=torch.long, device=model.device)  # any id: the values are never read
    for length in chunks:
        model.forward(token.expand(length).contiguous(), prompt)
    model.forward(token.expand(3).contiguous(), other)
    for _ in range(DECODE_STEPS):
        model.forward_segments([(token, prompt), (token, other)])
    return sum(chunks) + 3 + 2 * DECODE_STEPS
