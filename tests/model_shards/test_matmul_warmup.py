"""The start-up matmul warm-up covers every step size (model_shards/matmul_warmup.py)."""

import torch

from model_shards.matmul_warmup import LADDER_RATIO, distinct_linears, row_count_ladder, warm_up_matmuls


def test_the_ladder_reaches_every_step_size_within_the_ratio():
    ladder = row_count_ladder(16384)
    assert ladder[0] == 1 and ladder[-1] == 16384
    assert ladder == sorted(set(ladder))
    assert all(later <= max(earlier + 1, earlier * LADDER_RATIO + 8) for earlier, later in zip(ladder, ladder[1:]))
    assert len(ladder) < 40  # tens of matmuls per weight, not thousands
    assert all(count % 8 == 0 for count in ladder[:-1] if count >= 16)  # tile-friendly sizes past 16


def test_small_ladders():
    assert row_count_ladder(1) == [1]
    assert row_count_ladder(4) == [1, 2, 3, 4]
    assert row_count_ladder(256, smallest=64) == [64, 96, 144, 216, 256]


def test_one_linear_per_shape_and_every_call_counted():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 16, bias=False),
                                torch.nn.Linear(16, 8, bias=False))
    linears = distinct_linears(layer)
    assert [(linear.in_features, linear.out_features) for linear in linears] == [(8, 16), (16, 8)]
    assert warm_up_matmuls([linear.weight for linear in linears], [1, 3, 7]) == 6
