"""Grouped-matmul experts (model_shards/deepseek_v4/grouped_experts.py) against the plain
per-expert loop they replaced: one matmul per expert over the tokens routed to it, accumulated
with index_add in expert order.

float32, so the two differ only by summation order (slots summed per token vs accumulated per
expert): ~1e-7 relative; a row sent to the wrong expert, a lost slot or a weight applied twice
moves outputs by O(1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_shards.deepseek_v4.grouped_experts import grouped_linear, sort_by_expert
from model_shards.deepseek_v4.moe import LocalExperts, clipped_swiglu
from model_shards.parallel.groups import ParallelGroup
from model_folder.deepseek_v4_config import parse_deepseek_v4_config
from model_shards.deepseek_v4.presets import preset_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def per_expert_loop(experts: LocalExperts, x: torch.Tensor, weights: torch.Tensor,
                    expert_ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    local = expert_ids - experts.first
    for expert in range(experts.num_local):
        token, slot = torch.where(local == expert)
        gate, up = F.linear(x[token], experts.gate_up[expert]).split(experts.intermediate, dim=-1)
        y = F.linear(clipped_swiglu(gate, up, experts.limit), experts.down[expert])
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


class OneRankOf:
    """The rank/size of an expert-parallel group, without the collectives (none are called here)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def split(self, total: int, name: str) -> int:
        return ParallelGroup.single().split(total, name) // self.size


def random_experts(rank: int = 0, size: int = 1, experts: int = 8) -> LocalExperts:
    arch = parse_deepseek_v4_config(preset_config("deepseek-v4-tiny", n_routed_experts=experts))
    module = LocalExperts(arch, OneRankOf(rank, size), torch.float32)
    generator = torch.Generator().manual_seed(rank)
    for parameter in module.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
    return module


def routing(tokens: int, experts: int, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
    return torch.rand(tokens, k, generator=generator), ids


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_grouped_experts_equal_the_per_expert_loop(tokens):
    experts = random_experts()
    x = torch.randn(tokens, experts.gate_up.shape[-1], generator=torch.Generator().manual_seed(1))
    weights, ids = routing(tokens, 8)
    expected = per_expert_loop(experts, x, weights, ids)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(experts(x, weights, ids), expected, atol=1e-6, rtol=1e-5)


def test_each_expert_parallel_rank_computes_only_its_experts():
    """Two ranks of 4 experts each: their outputs sum to the single-rank output, and each equals
    the loop over that rank's experts alone."""
    whole = random_experts(experts=8)
    x = torch.randn(9, whole.gate_up.shape[-1], generator=torch.Generator().manual_seed(2))
    weights, ids = routing(9, 8, seed=3)
    total = torch.zeros_like(x)
    for rank in range(2):
        part = random_experts(rank, 2, experts=8)
        part.gate_up.data, part.down.data = whole.gate_up.data[rank * 4:(rank + 1) * 4], whole.down.data[rank * 4:(rank + 1) * 4]
        output = part(x, weights, ids)
        torch.testing.assert_close(output, per_expert_loop(part, x, weights, ids), atol=1e-6, rtol=1e-5)
        total += output
    torch.testing.assert_close(total, whole(x, weights, ids), atol=1e-6, rtol=1e-5)


def test_rows_sort_by_expert_with_remote_rows_last():
    local = torch.tensor([[2, -1], [0, 2], [5, 0]])  # -1 and 5: experts another rank holds (3 here)
    rows = sort_by_expert(local, 3)
    assert rows.order.tolist() == [2, 5, 0, 3, 1, 4]
    assert rows.offsets.tolist() == [2, 2, 4]
    assert rows.tokens.tolist() == [1, 2, 0, 1, 0, 2]
    assert rows.held.tolist() == [[True, False], [True, True], [False, True]]


@pytest.mark.parametrize("width", [8, 6])  # rows of 32 bytes: torch._grouped_mm; of 24: the loop
def test_grouped_linear_multiplies_each_group_by_its_weight(width):
    generator = torch.Generator().manual_seed(4)
    rows, weight = torch.randn(7, width, generator=generator), torch.randn(3, width // 2, width, generator=generator)
    offsets = torch.tensor([2, 2, 6], dtype=torch.int32)  # group 1 empty, row 6 past the last group
    out = grouped_linear(rows, weight, offsets)
    expected = torch.cat([rows[:2] @ weight[0].T, rows[2:6] @ weight[2].T])
    torch.testing.assert_close(out[:6], expected, atol=1e-6, rtol=1e-5)
