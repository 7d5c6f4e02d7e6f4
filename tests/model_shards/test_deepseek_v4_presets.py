"""`longctx make-model --preset deepseek-v4-*` writes folders transformers and our model both load."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, DeepseekV4Config
from transformers import DeepseekV4ForCausalLM as ReferenceModel

from model_folder.deepseek_v4_config import parse_deepseek_v4_config
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.presets import make_deepseek_v4_model, num_parameters, preset_config, weight_specs
from model_shards.make_model import add_make_model_arguments, run_make_model

# the flash-shape preset's code path at toy sizes (every real shape is far too large for a test)
SMALL_FLASH = dict(hidden_size=64, head_dim=32, num_attention_heads=4, q_lora_rank=32, o_lora_rank=16, o_groups=2,
                   index_n_heads=16, index_head_dim=16, n_routed_experts=8, moe_intermediate_size=32, vocab_size=1024,
                   compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                   sliding_window=8)  # fmt: skip


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_make_model_arguments(parser)
    return parser.parse_args(list(argv))


def stored_shapes(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as file:
        return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}


def test_tiny_preset_is_what_transformers_saves(tmp_path, capsys):
    folder = run_make_model(cli(str(tmp_path), "--preset", "deepseek-v4-tiny", "--seed", "3"))
    assert "deepseek_v4 deepseek-v4-tiny, 4 layers" in capsys.readouterr().out
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV4ForCausalLM"] and config["transformers_version"]
    arch = parse_deepseek_v4_config(config)
    assert stored_shapes(folder) == {spec.name: spec.shape for spec in weight_specs(arch)}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user") and text.endswith("assistant<|end_header_id|>\n\n")
    assert max(tokenizer(text)["input_ids"]) < arch.vocab_size


def test_flash_shape_layers_and_parameter_count_match_transformers():
    config = preset_config("deepseek-v4-flash-shape", layers=4, n_routed_experts=8)
    arch = parse_deepseek_v4_config(config)
    hf_full = DeepseekV4Config()  # its defaults are the V4-Flash shape with all 43 layers
    assert list(arch.layer_types) == hf_full.layer_types[:4] and list(arch.mlp_layer_types) == hf_full.mlp_layer_types[:4]
    assert (arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.index_topk) == (4096, 512, 64, 512)
    with torch.device("meta"):
        reference = ReferenceModel(DeepseekV4Config(**{k: v for k, v in config.items() if k != "torch_dtype"}))
    assert num_parameters(arch) == sum(tensor.numel() for tensor in reference.state_dict().values())


def test_streamed_flash_shape_folder_loads_in_transformers_and_here(tmp_path):
    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-flash-shape", layers=4, dtype="float32",
                                    max_shard_bytes=200_000, **SMALL_FLASH)
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    reference, info = ReferenceModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.eval()(ids[None], use_cache=False).logits[0]
    ours = DeepseekV4ForCausalLM.from_folder(folder)
    torch.testing.assert_close(ours.compute_logits(ours(ids, ours.new_state())), expected, atol=1e-4, rtol=0)


def test_bad_preset_options_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="--architecture and --rope-scaling do not apply"):
        run_make_model(cli(str(tmp_path), "--preset", "deepseek-v4-tiny", "--architecture", "qwen2"))
    with pytest.raises(ValueError, match="layers=9 exceeds the preset's 4 layers"):
        preset_config("deepseek-v4-tiny", layers=9)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("deepseek-v4-huge")


def test_layers_option_sets_the_layer_count_of_llama_presets_too(tmp_path):
    folder = run_make_model(cli(str(tmp_path), "--preset", "tiny", "--layers", "3"))
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 3
