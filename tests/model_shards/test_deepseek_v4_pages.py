"""DeepSeek-V4's page layouts: bytes per token of the compressed pool equal the config's formula
(model_folder/deepseek_v4_kv_budget.py), fields are typed views of one contiguous block."""

from __future__ import annotations

import torch

from model_folder.deepseek_v4_config import CSA, parse_deepseek_v4_config
from model_folder.deepseek_v4_kv_budget import kv_bytes_per_token
from model_shards.deepseek_v4.kv_pages import PagePool, compressed_layout, plan_pool_sizes, window_layout
from model_shards.deepseek_v4.paged_state import BlockTableMirror
from model_shards.deepseek_v4.presets import preset_config

FLASH = parse_deepseek_v4_config(preset_config("deepseek-v4-flash-shape"))  # 43 layers, bf16
TINY = parse_deepseek_v4_config(preset_config("deepseek-v4-tiny"))


def test_flash_shape_compressed_pages_hold_the_formulas_bytes_per_token():
    assert FLASH.num_hidden_layers == 43 and FLASH.kv_block_multiple == 128
    layout = compressed_layout(FLASH, 128, torch.bfloat16)
    assert layout.nbytes / 128 == kv_bytes_per_token(FLASH)["total"] == 6584.0


def test_flash_shape_window_block_holds_raw_keys_and_the_overlap_halves():
    layout = window_layout(FLASH, 128, torch.bfloat16)
    keys = 43 * 128 * 512 * 2
    csa_layers = FLASH.layer_types.count(CSA)
    overlaps = csa_layers * 4 * (512 + 128) * (2 + 4)  # kv in bf16, gate logits in float32
    assert layout.nbytes == keys + overlaps


def test_fields_are_typed_views_into_one_contiguous_block():
    pool = PagePool(window_layout(TINY, 16, torch.float32), 3, "cpu")
    keys, gate = pool.view(1, "keys"), pool.view(1, "overlap_gate")
    assert keys.shape == (3, 16, 32) and gate.shape == (3, 4, 32) and gate.dtype == torch.float32
    keys[2, 5] = torch.arange(32.0)
    gate[2] = 7.0
    assert torch.equal(pool.view(1, "keys")[2, 5], torch.arange(32.0))
    assert pool.block(2).view(torch.float32).count_nonzero() == 31 + 4 * 32
    assert pool.block(1).count_nonzero() == 0


def test_pool_sizes_give_the_window_what_running_requests_and_a_step_need():
    sizes = plan_pool_sizes(FLASH, 128, 80 << 30, 6584 * 128, window_layout(FLASH, 128, torch.bfloat16).nbytes,
                            max_num_seqs=256, max_tokens_per_step=16384)
    assert sizes.window_blocks == 256 * 2 + 128 + 1
    window_bytes = sizes.window_blocks * window_layout(FLASH, 128, torch.bfloat16).nbytes
    assert sizes.compressed_blocks == ((80 << 30) - window_bytes) // (6584 * 128)


def test_a_block_table_mirror_copies_only_appended_ids_and_grows_on_the_device():
    mirror = BlockTableMirror(torch.device("cpu"))
    ids: list[int] = []
    for new_ids in ([4, 9], [], [1], list(range(100, 170)), [-1, 3]):
        ids += new_ids
        table = mirror.update(ids)
        assert table.dtype == torch.long and table.tolist() == ids and mirror.count == len(ids)
    kept = mirror.table.data_ptr()
    mirror.table[0] = 77  # a row already copied is never copied again
    assert mirror.update(ids + [5])[:2].tolist() == [77, 9] and mirror.table.data_ptr() == kept
