"""A released (FP8 / FP4) DeepSeek-V4 folder under tensor and expert parallelism (gloo, 2 ranks)
gives one rank's logits: each rank dequantizes only its part of each weight and of its scale grid.

The tiny preset's shard boundaries fall inside 128 x 128 blocks: wq_b's 128 rows split 64 / 64,
wo_b's 32 columns 16 / 16, the shared expert's 32 channels 16 / 16 (one block each), so every
rank must find the scales of a block it holds only part of; the indexer's wq_b (256 rows, two
row blocks) splits on the block boundary, so rank 1 must take the second block's scale (float
scales differ per block; ue8m0 ones may not). Experts go whole to one rank (EP), with their
scales. Same tolerance and job as test_deepseek_v4_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from deepseek_v4_jobs import run_deepseek_v4_chunks
from model_folder.deepseek_v4_quantization import BlockQuantization
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.rank import RankContext

TOLERANCE = 1e-4
CHUNKS = [6, 7, 11, 13, 1, 1, 1]


@pytest.mark.parametrize("experts, scales", [("fp8", "ue8m0"), ("fp4", "float")])
def test_tp2_ep2_on_a_released_folder_equals_one_rank(world2, tmp_path, experts, scales):
    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=9,
                                    quantization=BlockQuantization(scale_format=scales, expert_format=experts))
    token_ids = torch.randint(0, 1000, (sum(CHUNKS),), generator=torch.Generator().manual_seed(10)).tolist()
    args = (token_ids, CHUNKS, 2)
    single, single_state = run_deepseek_v4_chunks(RankContext(0, 1, torch.device("cpu")), folder, 1, *args)
    per_rank = world2.call(run_deepseek_v4_chunks, folder, 2, *args)
    assert single.abs().max() > 1.0
    for logits, state in per_rank:
        assert (logits - single).abs().max().item() <= TOLERANCE
        torch.testing.assert_close(state, single_state, atol=1e-4, rtol=0)


@pytest.mark.parametrize("experts, scales", [("fp8", "ue8m0"), ("fp4", "float")])
def test_tp2_ep2_keeping_weights_quantized_equals_dequantizing(world2, tmp_path, experts, scales):
    """model.quantized_weights keep: each rank keeps its own part (wq_b's 64-row halves and
    wo_b's 16-column halves re-blocked inside their one block, whole experts as stored); off CUDA
    every rank computes its dequantizing twin's numbers, so the logits are bit-equal."""
    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=9,
                                    quantization=BlockQuantization(scale_format=scales, expert_format=experts))
    token_ids = torch.randint(0, 1000, (sum(CHUNKS),), generator=torch.Generator().manual_seed(10)).tolist()
    dequantized = world2.call(run_deepseek_v4_chunks, folder, 2, token_ids, CHUNKS, 2)
    kept = world2.call(run_deepseek_v4_chunks, folder, 2, token_ids, CHUNKS, 2, True)
    for (kept_logits, kept_state), (logits, state) in zip(kept, dequantized):
        assert logits.abs().max() > 1.0
        assert torch.equal(kept_logits, logits) and torch.equal(kept_state, state)
