"""make_model writes folders that transformers loads exactly as published checkpoints."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

import model_folder.tokenizer_training as tokenizer_training
from model_folder.tokenizer_training import trained_tokenizer_json
from model_shards.make_model import PRESETS, add_make_model_arguments, make_model, resolve_preset, run_make_model
from model_shards.random_checkpoint import TensorSpec, make_tensor

ROPE_SCALINGS = [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32.0,
     "beta_slow": 1.0, "attention_factor": 1.2},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512},
]  # fmt: skip


def load(folder):
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_transformers_loads_every_architecture_tied_or_not(tmp_path, architecture, tied):
    model = load(make_model(tmp_path, architecture=architecture, tie_word_embeddings=tied))
    assert model.config.model_type == architecture
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (architecture == "qwen2")
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, PRESETS["tiny"].vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("rope_scaling", ROPE_SCALINGS, ids=lambda scaling: scaling["rope_type"])
def test_rope_scaling_is_written_the_classic_way_and_read_back_by_transformers(tmp_path, rope_scaling):
    folder = make_model(tmp_path, rope_scaling=rope_scaling)
    written = json.loads((folder / "config.json").read_text())
    assert written["rope_scaling"] == rope_scaling and written["rope_theta"] == PRESETS["tiny"].rope_theta
    parameters = AutoConfig.from_pretrained(folder).rope_parameters
    assert {key: parameters[key] for key in rope_scaling} == rope_scaling
    load(folder)


def test_legacy_type_key_is_written_as_rope_type(tmp_path):
    folder = make_model(tmp_path, rope_scaling={"type": "linear", "factor": 2.0})
    assert json.loads((folder / "config.json").read_text())["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    first, second, other = (make_model(tmp_path / name, seed=seed) for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_tokenizer_training_is_deterministic_across_processes():
    program = "from model_folder.tokenizer_training import trained_tokenizer_json; print(trained_tokenizer_json(1024))"
    other_process = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert other_process.stdout == trained_tokenizer_json(1024) + "\n"


def test_sharded_weights_load_and_equal_the_single_file(tmp_path):
    single = load(make_model(tmp_path / "single", architecture="qwen2"))
    sharded_folder = make_model(tmp_path / "sharded", architecture="qwen2", max_shard_bytes=100_000)
    index = json.loads((sharded_folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (sharded_folder / "model.safetensors").exists()
    sharded = load(sharded_folder)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(single(ids).logits, sharded(ids).logits)


def test_rewriting_a_folder_removes_stale_shards(tmp_path):
    make_model(tmp_path, max_shard_bytes=100_000)
    make_model(tmp_path)
    assert sorted(path.name for path in tmp_path.glob("model*")) == ["model.safetensors"]


def test_streamed_safetensors_hold_the_generated_values_in_the_preset_dtype(tmp_path):
    folder = make_model(tmp_path, dtype="bfloat16")
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        down = weights.get_tensor("model.layers.1.mlp.down_proj.weight")
    expected = make_tensor(TensorSpec("model.layers.1.mlp.down_proj.weight", (64, 128), 128**-0.5), seed=0)
    assert down.dtype == torch.bfloat16 and torch.equal(down, expected.to(torch.bfloat16))
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_random_model_is_peaked_and_greedy_does_not_loop_on_one_token(tmp_path):
    model = load(make_model(tmp_path))
    tokens = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("The quick brown fox").ids
    out = model.generate(torch.tensor([tokens]), max_new_tokens=64, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    generated = out.sequences[0, len(tokens) :].tolist()
    top2 = torch.stack([scores[0] for scores in out.scores]).topk(2).values
    margins = top2[:, 0] - top2[:, 1]
    assert len(generated) == 64 and len(set(generated)) > 16
    # float32 reorderings move these logits by ~1e-5; the smallest gap must stay far above that.
    assert margins.min() > 1e-3 and margins.median() > 0.3


def test_tokenizer_splits_multibyte_characters_and_ends_with_special_tokens(tmp_path):
    folder = make_model(tmp_path)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == PRESETS["tiny"].vocab_size
    assert tokenizer.token_to_id("<|eot_id|>") == PRESETS["tiny"].vocab_size - 1
    ids = tokenizer.encode("東京😀").ids
    assert ids[0] == tokenizer.token_to_id("<|begin_of_text|>") and len(ids) - 1 > 3
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]


def test_vocabulary_beyond_the_tokenizer_gets_padding_rows_that_greedy_never_picks(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_training, "MAX_TOKENIZER_VOCAB", 1024)  # what 128256 does, but fast
    folder = make_model(tmp_path, vocab_size=2048)
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size() == 1024
    model = load(folder)
    assert model.lm_head.weight.shape == (2048, 64)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert out.max() < 1024 - 5  # neither padding rows nor special tokens


def test_llama3_8b_shape_preset_has_llama3_8b_parameter_count():
    preset = PRESETS["llama3-8b-shape"]
    assert preset.num_parameters() == 8_030_261_248
    assert preset.rope_scaling["rope_type"] == "llama3" and preset.torch_dtype == "bfloat16"
    assert resolve_preset("llama3-8b-shape", rope_scaling={"rope_type": "default"}).rope_scaling is None


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"preset": "huge"}, "unknown preset"),
        ({"hidden_sise": 64}, "unknown model setting 'hidden_sise'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_size": "64"}, "hidden_size must be int"),
        ({"architecture": "gpt2"}, "unknown architecture"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks"),
        ({"dtype": "int8"}, "torch_dtype must be one of"),
    ],
)
def test_bad_settings_raise_one_line_value_errors(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message) as error:
        make_model(tmp_path, **arguments)
    assert "\n" not in str(error.value)


def test_cli_helpers_parse_presets_overrides_and_rope_scaling(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_make_model_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--architecture", "mistral", "--set", "num_hidden_layers=3",
                              "--set", "tie_word_embeddings=true", "--set", "rope_theta=20000",
                              "--rope-scaling", '{"rope_type": "linear", "factor": 2.0}'])  # fmt: skip
    config = json.loads((run_make_model(args) / "config.json").read_text())
    assert (config["num_hidden_layers"], config["tie_word_embeddings"], config["rope_theta"]) == (3, True, 20000.0)
    assert config["rope_scaling"]["factor"] == 2.0 and config["sliding_window"] is None
    assert "mistral tiny" in capsys.readouterr().out
    with pytest.raises(ValueError, match="KEY=VALUE"):
        run_make_model(parser.parse_args([str(tmp_path), "--set", "num_hidden_layers"]))
