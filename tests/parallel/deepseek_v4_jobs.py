"""A job the DeepSeek-V4 parallelism tests run on every rank of a spawned world (module-level, so
that it pickles by name; see rank_jobs.py for the worlds)."""

from __future__ import annotations

from pathlib import Path

import torch

from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from rank_jobs import layout_for


def run_deepseek_v4_chunks(context, folder: Path, tp: int, token_ids: list[int], chunks: list[int],
                           resume_after: int, keep_quantized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the chunks of one sequence; snapshot the state after `resume_after` chunks and run the
    rest again from it. Returns (logits of every position, then of the resumed part) and a
    checksum of this rank's state (replicated: every rank must hold the same). keep_quantized:
    model.quantized_weights keep."""
    layout = layout_for(context, tp, 1)
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32, tp=layout.tp, keep_quantized=keep_quantized)
    ids = torch.tensor(token_ids)
    state, logits, start, saved = model.new_state(), [], 0, None
    for index, size in enumerate(chunks):
        if index == resume_after:
            saved = (state.snapshot(), start)
        logits.append(model.compute_logits(model(ids[start:start + size], state)))
        start += size
    resumed, start = saved
    logits.append(model.compute_logits(model(ids[start:], resumed)))
    checksum = torch.stack([torch.cat([t.entries.read(0, t.entries.count).sum().view(1) for t in (layer.compressor, layer.indexer) if t])
                            .sum() for layer in state.layers if layer.compressor])
    return torch.cat(logits), checksum
