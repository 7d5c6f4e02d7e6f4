"""DeepSeek-V4 config.json parsing means what transformers' DeepseekV4Config means, legacy keys too."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

from model_folder.deepseek_v4_config import CSA, HCA, SLIDING, parse_deepseek_v4_config
from model_folder.deepseek_v4_kv_budget import kv_bytes_per_token, max_fixed_bytes_per_request
from model_folder.deepseek_v4_quantization import BlockQuantization, parse_block_quantization
from model_shards.deepseek_v4.presets import PRESETS, preset_config
from model_shards.deepseek_v4.rope import InterleavedRotary
from model_folder.errors import ModelFolderError
from model_folder.hf_config import load_architecture

SMALL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, head_dim=32, q_lora_rank=32,
             o_groups=2, o_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=8192)
LEGACY = {**SMALL, "compress_ratios": [0, 4, 128, 4, 0, 128], "compress_rate_hca": 16, "num_hash_layers": 2,
          "qk_rope_head_dim": 8, "rope_theta": 5000.0, "compress_rope_theta": 40000.0,
          "rope_scaling": {"type": "yarn", "factor": 8, "original_max_position_embeddings": 1024,
                           "beta_fast": 16, "beta_slow": 2}}  # fmt: skip
NESTED = {**SMALL, "layer_types": [SLIDING, CSA, HCA, CSA, HCA], "mlp_layer_types": ["hash_moe"] + ["moe"] * 4,
          "rope_parameters": {"main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                              "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 4.0,
                                           "original_max_position_embeddings": 2048, "partial_rotary_factor": 0.25}}}
# V4-Flash's config.json (expert_dtype sits beside it, at the top level)
FLASH_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                      "weight_block_size": [128, 128]}
CONFIGS = {"defaults": SMALL, "legacy": LEGACY, "nested": NESTED, "tiny-preset": PRESETS["deepseek-v4-tiny"],
           "flash-shape": preset_config("deepseek-v4-flash-shape")}  # fmt: skip


def hf_config(config: dict) -> DeepseekV4Config:
    return DeepseekV4Config(**{k: v for k, v in config.items() if k != "torch_dtype"})


@pytest.mark.parametrize("name", CONFIGS)
def test_layer_schedules_and_shapes_match_transformers(name):
    config, hf = CONFIGS[name], hf_config(CONFIGS[name])
    arch = parse_deepseek_v4_config(json.loads(json.dumps(config)))
    assert list(arch.layer_types) == hf.layer_types
    assert list(arch.mlp_layer_types) == hf.mlp_layer_types
    assert dict(arch.compress_rates) == hf.compress_rates
    for field in ("hidden_size", "num_hidden_layers", "head_dim", "sliding_window", "index_topk", "hc_mult",
                  "n_routed_experts", "moe_intermediate_size", "routed_scaling_factor", "swiglu_limit"):
        assert getattr(arch, field) == getattr(hf, field), field


@pytest.mark.parametrize("name", CONFIGS)
def test_rope_frequencies_equal_transformers_for_both_labels(name):
    config = CONFIGS[name]
    arch, hf = parse_deepseek_v4_config(json.loads(json.dumps(config))), hf_config(config)
    reference = DeepseekV4RotaryEmbedding(hf)
    positions = torch.tensor([0, 1, 7, 100, 5000, 65535])
    for label, spec in (("main", arch.main_rope), ("compress", arch.compress_rope)):
        cos, sin = InterleavedRotary(spec, arch.max_position_embeddings, torch.float32, "cpu").cos_sin(positions)
        hf_cos, hf_sin = reference(torch.zeros(1), positions[None], layer_type=label)
        assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0]), label


def test_legacy_keys_fold_into_the_modern_fields():
    arch = parse_deepseek_v4_config(LEGACY)
    assert arch.layer_types == (SLIDING, CSA, HCA, CSA, SLIDING)  # compress_ratios cut to the 5 layers
    assert arch.compress_rate(HCA) == 16 and arch.mlp_layer_types == ("hash_moe",) * 2 + ("moe",) * 3
    assert arch.compress_rope.rotary_dim == 8 and arch.compress_rope.theta == 40000.0
    assert arch.compress_rope.scaling.factor == 8 and arch.compress_rope.scaling.attention_factor == 1.0
    assert arch.main_rope.scaling is None and arch.main_rope.theta == 5000.0


def test_load_architecture_dispatches_deepseek_v4_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "architectures": ["DeepseekV4ForCausalLM"]}))
    arch = load_architecture(tmp_path)
    assert arch.architecture == "deepseek_v4" and arch.layer_types[:2] == (HCA, HCA)


@pytest.mark.parametrize("change, message", [
    ({"layer_types": [SLIDING, "full_attention", HCA, CSA, HCA]}, "layer_types entries must be one of"),
    ({"layer_types": [SLIDING]}, "layer_types has 1 entries for 5 layers"),
    ({"compress_ratios": [0, 4, 64, 4, 0]}, "compress_ratios entries must be 0, 4 or 128"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported"),
    ({"quantization_config": {"quant_method": "awq"}}, r"quantization_config.quant_method 'awq' is not supported"),
    ({"quantization_config": {**FLASH_QUANTIZATION, "fmt": "e5m2"}}, r"quantization_config.fmt 'e5m2'"),
    ({"quantization_config": {**FLASH_QUANTIZATION, "activation_scheme": "static"}},
     "static activation scales are not supported"),
    ({"quantization_config": {**FLASH_QUANTIZATION, "weight_block_size": [128]}},
     "weight_block_size must be two positive integers"),
    ({"quantization_config": {**FLASH_QUANTIZATION, "scale_fmt": "e8m0"}}, r"quantization_config.scale_fmt 'e8m0'"),
    ({"quantization_config": {**FLASH_QUANTIZATION, "group_size": 32}}, "quantization_config.group_size is not"),
    ({"quantization_config": {**FLASH_QUANTIZATION, "modules_to_convert": ["embed"]}}, "quantized embeddings"),
    ({"quantization_config": FLASH_QUANTIZATION, "expert_dtype": "int4"}, "expert_dtype 'int4' is not supported"),
    ({"quantization_config": {**FLASH_QUANTIZATION, "expert_dtype": "fp8"}, "expert_dtype": "fp4"}, "disagree"),
    ({"expert_dtype": "fp4"}, "expert_dtype 'fp4' needs a quantization_config"),
    ({"rope_scaling": {"type": "llama3", "factor": 8}}, "rope_type 'llama3' is not supported"),
    ({"o_groups": 3}, "not divisible by o_groups=3"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer"),
])  # fmt: skip
def test_bad_configs_name_the_key(change, message):
    with pytest.raises(ModelFolderError, match=message):
        parse_deepseek_v4_config({**SMALL, **change})


def test_flash_shape_kv_bytes_per_token():
    """The issue's figures: 320 bytes a CSA layer, 8 an HCA layer, in bf16, per token."""
    arch = parse_deepseek_v4_config(preset_config("deepseek-v4-flash-shape"))
    per_token = kv_bytes_per_token(arch)
    assert (arch.layer_types.count(CSA), arch.layer_types.count(HCA)) == (20, 23)
    assert per_token == {CSA: 20 * 320.0, HCA: 23 * 8.0, "total": 6584.0}
    assert max_fixed_bytes_per_request(arch) < 12 << 20  # under 12 MiB a request, whatever its length


def test_tensor_parallel_sizes_split_heads_groups_and_experts():
    flash = parse_deepseek_v4_config(preset_config("deepseek-v4-flash-shape"))
    assert flash.tensor_parallel_sizes() == [1, 2, 4, 8]  # 8 output groups bound it
    tiny = parse_deepseek_v4_config(PRESETS["deepseek-v4-tiny"])
    assert tiny.tensor_parallel_sizes() == [1, 2]
    with pytest.raises(ValueError, match="valid sizes: 1, 2"):
        tiny.check_tensor_parallel(4)


@pytest.mark.parametrize("config, expected", [
    ({"quantization_config": FLASH_QUANTIZATION, "expert_dtype": "fp4"}, BlockQuantization((128, 128), "ue8m0", "fp4")),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32], "expert_dtype": "fp4",
                              "dequantize": False, "modules_to_not_convert": ["lm_head"]}},
     BlockQuantization((64, 32), "float", "fp4")),  # transformers' FineGrainedFP8Config as it saves itself
    ({"quantization_config": {"quant_method": "fp8"}}, BlockQuantization((128, 128), "float", "fp8")),
    ({}, None),
])  # fmt: skip
def test_released_quantization_configs_are_read(config, expected):
    assert parse_block_quantization(config) == expected
    parse_deepseek_v4_config({**SMALL, **config})  # and accepted
