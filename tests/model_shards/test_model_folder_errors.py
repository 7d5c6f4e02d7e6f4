"""A broken model folder fails at load with a ModelFolderError that names the file or key;
half-precision loads run and stay near float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_folder.errors import ModelFolderError
from model_folder.hf_config import load_architecture
from model_shards.llama import LlamaForCausalLM

DROPPED_TENSOR = "model.layers.1.mlp.up_proj.weight"


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_config_json(fresh_folder):
    folder = fresh_folder()
    (folder / "config.json").unlink()
    with pytest.raises(ModelFolderError, match="config.json"):
        load_architecture(folder)


def test_unknown_architecture(fresh_folder):
    folder = fresh_folder()
    edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelFolderError, match="architectures.*GPT2LMHeadModel"):
        load_architecture(folder)


def test_missing_required_key(fresh_folder):
    folder = fresh_folder()
    edit_config(folder, hidden_size=None)
    with pytest.raises(ModelFolderError, match="hidden_size"):
        load_architecture(folder)


@pytest.mark.parametrize("rope_key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_type(fresh_folder, rope_key):
    folder = fresh_folder()
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    edit_config(folder, **{"rope_scaling": None, rope_key: longrope})
    with pytest.raises(ModelFolderError, match=f"{rope_key}.rope_type 'longrope'"):
        load_architecture(folder)


def test_sliding_window_smaller_than_context_is_refused(fresh_folder):
    folder = fresh_folder(architecture="mistral")
    edit_config(folder, sliding_window=1024)  # make_model's max_position_embeddings is 4096
    with pytest.raises(ModelFolderError, match="sliding_window=1024.*full attention"):
        load_architecture(folder)


def test_missing_weight_tensor(fresh_folder):
    folder = fresh_folder()
    edit_weights(folder, lambda tensors: tensors.pop(DROPPED_TENSOR))
    with pytest.raises(ModelFolderError, match=DROPPED_TENSOR):
        LlamaForCausalLM.from_folder(folder)


def test_weight_with_wrong_shape(fresh_folder):
    folder = fresh_folder()
    edit_weights(folder, lambda tensors: tensors.update(
        {DROPPED_TENSOR: tensors[DROPPED_TENSOR][:-1].clone()}))
    with pytest.raises(ModelFolderError, match=f"{DROPPED_TENSOR}.*shape"):
        LlamaForCausalLM.from_folder(folder)


def test_unexpected_extra_tensor(fresh_folder):
    folder = fresh_folder()
    edit_weights(folder, lambda tensors: tensors.update(
        {"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2),
         "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}))  # ignorable
    with pytest.raises(ModelFolderError, match=r"unexpected.*model\.layers\.9") as error:
        LlamaForCausalLM.from_folder(folder)
    assert "inv_freq" not in str(error.value)


def test_missing_safetensors_shard(fresh_folder):
    folder = fresh_folder(max_shard_bytes=200_000)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    shards[1].unlink()
    with pytest.raises(ModelFolderError, match=shards[1].name):
        LlamaForCausalLM.from_folder(folder)


def test_sharded_checkpoint_loads_like_single_file(fresh_folder, model_folder, prefill_logits):
    tokens = torch.arange(10)
    single = LlamaForCausalLM.from_folder(model_folder(), dtype=torch.float32)
    sharded = LlamaForCausalLM.from_folder(fresh_folder(max_shard_bytes=200_000),
                                           dtype=torch.float32)
    assert torch.equal(prefill_logits(single, tokens), prefill_logits(sharded, tokens))


def test_no_safetensors_at_all(fresh_folder):
    folder = fresh_folder()
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="model.safetensors"):
        LlamaForCausalLM.from_folder(folder)


# Half precision: finite, and near float32. Bounds: make_model's logits reach |18| (std 4); bf16
# keeps 8 mantissa bits (relative rounding ~2e-3 per operation), so two layers move logits by
# ~0.15 (measured 0.13; transformers' own bf16 run moves them 0.15). fp16 keeps 11 bits: ~8x less
# (measured 0.02). The bounds leave ~4x margin and still catch a wrong cast (a norm computed in
# half precision or logits cast too early move them by whole units).
HALF_PRECISION_BOUNDS = {torch.bfloat16: 0.5, torch.float16: 0.1}


@pytest.mark.parametrize("dtype", list(HALF_PRECISION_BOUNDS), ids=str)
def test_half_precision_runs_close_to_float32(dtype, model_folder, prefill_logits):
    folder = model_folder(num_key_value_heads=2)
    tokens = torch.randint(0, 1024, (38,), generator=torch.Generator().manual_seed(1))
    reference = prefill_logits(LlamaForCausalLM.from_folder(folder, dtype=torch.float32), tokens)
    model = LlamaForCausalLM.from_folder(folder, dtype=dtype)
    assert model.embed_tokens.weight.dtype == dtype
    logits = prefill_logits(model, tokens)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - reference).abs().max().item() <= HALF_PRECISION_BOUNDS[dtype]


def test_dtype_defaults_to_the_checkpoint_dtype(model_folder, prefill_logits):
    folder = model_folder(dtype="bfloat16")
    model = LlamaForCausalLM.from_folder(folder)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(prefill_logits(model, torch.arange(12))).all()
