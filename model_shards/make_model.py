"""Write a complete Hugging Face model folder with deterministic random weights.

No model hub is reachable here, so every test and demo builds its own model: a real config.json,
real safetensors (sharded with an index when large), a real byte-level BPE tokenizer trained
locally, a Llama-3-style chat template and generation_config.json. transformers loads the result
with `from_pretrained`, which makes it the reference our engine is compared against.
Tensor values and the file writers live in random_checkpoint.py (shared with the V4 presets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from tokenizers import Tokenizer

from model_folder.tokenizer_training import MIN_VOCAB, SPECIAL_TOKENS
from model_shards.random_checkpoint import BIAS_STD, DTYPES, EMBEDDING_STD, LOGIT_STD, TIED_ROW_NORM, TensorSpec, \
    linear_spec, norm_spec, parse_overrides, special_token_ids, write_json, write_tokenizer_files, write_weights

DEFAULT_MAX_SHARD_BYTES = 4 << 30
DEEPSEEK_V4_PRESET_PREFIX = "deepseek-v4"  # those presets live in model_shards/deepseek_v4/presets.py
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_SCALING_KEYS = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"}, {"beta_fast", "beta_slow", "attention_factor"}),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
}


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a model; every field can be overridden by name."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    rope_scaling: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_field_types(self)
        _check_shape(self)
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", MappingProxyType(_checked_rope_scaling(self.rope_scaling)))

    def num_parameters(self, architecture: str = "llama") -> int:
        return sum(math.prod(spec.shape) for spec in weight_specs(self, architecture))


# --- presets and overrides ---------------------------------------------------------------------


def _check_field_types(preset: ModelPreset) -> None:
    hints = typing.get_type_hints(ModelPreset)
    for field in dataclasses.fields(preset):
        value = getattr(preset, field.name)
        expected = hints[field.name]
        if expected is float and type(value) is int:
            object.__setattr__(preset, field.name, float(value))  # JSON and CLI values say 500000 for 500000.0
        elif expected in (int, float, bool, str) and type(value) is not expected:
            raise ValueError(f"{field.name} must be {expected.__name__}, got {value!r}")


def _check_shape(preset: ModelPreset) -> None:
    positive = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "max_position_embeddings")  # fmt: skip
    for name in positive:
        if getattr(preset, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(preset, name)}")
    if preset.hidden_size % preset.num_attention_heads:
        # transformers' LlamaConfig rejects this even when head_dim is explicit.
        raise ValueError(f"hidden_size {preset.hidden_size} is not a multiple of num_attention_heads")
    if preset.num_attention_heads % preset.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if preset.head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {preset.head_dim}")
    if preset.vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (byte-level BPE), got {preset.vocab_size}")
    if preset.torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {preset.torch_dtype!r}")


def _checked_rope_scaling(rope_scaling: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with `rope_type` (older configs say `type`), after checking the keys for that type."""
    scaling = dict(rope_scaling)
    rope_type = scaling.pop("rope_type", scaling.pop("type", None))
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling rope_type must be one of {sorted(ROPE_SCALING_KEYS)}, got {rope_type!r}")
    required, optional = ROPE_SCALING_KEYS[rope_type]
    if missing := required - scaling.keys():
        raise ValueError(f"rope_scaling of type {rope_type} lacks {sorted(missing)}")
    if unknown := scaling.keys() - required - optional:
        raise ValueError(f"rope_scaling of type {rope_type} has unknown keys {sorted(unknown)}")
    if not isinstance(scaling["factor"], (int, float)) or scaling["factor"] < 1:
        raise ValueError(f"rope_scaling factor must be a number >= 1, got {scaling['factor']!r}")
    return {"rope_type": rope_type, **scaling}


def resolve_preset(
    preset: str, *, rope_scaling: Mapping[str, Any] | None = None, dtype: str | torch.dtype | None = None,
    **overrides: Any,
) -> ModelPreset:  # fmt: skip
    """The named preset with overrides applied; `{"rope_type": "default"}` removes rope scaling."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    known = {field.name for field in dataclasses.fields(ModelPreset)}
    if unknown := sorted(overrides.keys() - known):
        raise ValueError(f"unknown model setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    if rope_scaling is not None:
        default = rope_scaling.get("rope_type", rope_scaling.get("type")) == "default"
        overrides["rope_scaling"] = None if default else rope_scaling
    if dtype is not None:
        overrides["torch_dtype"] = _dtype_name(dtype)
    return dataclasses.replace(PRESETS[preset], **overrides)


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        names = {value: name for name, value in DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        return names[dtype]
    return dtype


LLAMA3_ROPE_SCALING = MappingProxyType(
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
)

PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=1024, max_position_embeddings=4096, rope_theta=10000.0,
    ),
    "small": ModelPreset(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        intermediate_size=1536, vocab_size=16384, max_position_embeddings=131072, rope_theta=500000.0,
    ),
    "llama3-8b-shape": ModelPreset(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        torch_dtype="bfloat16", rope_scaling=LLAMA3_ROPE_SCALING,
    ),
}  # fmt: skip


# --- weights -------------------------------------------------------------------------------------


def weight_specs(preset: ModelPreset, architecture: str, tokenizer_vocab: int | None = None) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in model order, with its Hugging Face name."""
    hidden, vocab = preset.hidden_size, preset.vocab_size
    unused_rows = None
    if tokenizer_vocab is not None:
        first_special = tokenizer_vocab - len(SPECIAL_TOKENS)
        unused_rows = (first_special, vocab - first_special)
    row_norm = TIED_ROW_NORM if preset.tie_word_embeddings else 1.0
    output = TensorSpec("lm_head.weight", (vocab, hidden), row_norm / math.sqrt(hidden), unused_rows=unused_rows)
    if preset.tie_word_embeddings:
        specs = [dataclasses.replace(output, name="model.embed_tokens.weight")]
    else:
        specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), EMBEDDING_STD)]
    for layer in range(preset.num_hidden_layers):
        specs += _layer_specs(preset, architecture, f"model.layers.{layer}.")
    specs.append(norm_spec("model.norm.weight", hidden, mean=LOGIT_STD / row_norm))
    if not preset.tie_word_embeddings:
        specs.append(output)
    return specs


def _layer_specs(preset: ModelPreset, architecture: str, prefix: str) -> list[TensorSpec]:
    hidden, ffn = preset.hidden_size, preset.intermediate_size
    q_out = preset.num_attention_heads * preset.head_dim
    kv_out = preset.num_key_value_heads * preset.head_dim
    specs = [norm_spec(prefix + "input_layernorm.weight", hidden)]
    for name, out_features in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        specs.append(linear_spec(prefix + f"self_attn.{name}.weight", out_features, hidden))
        if architecture == "qwen2":
            specs.append(TensorSpec(prefix + f"self_attn.{name}.bias", (out_features,), BIAS_STD))
    specs.append(linear_spec(prefix + "self_attn.o_proj.weight", hidden, q_out))
    specs.append(norm_spec(prefix + "post_attention_layernorm.weight", hidden))
    specs.append(linear_spec(prefix + "mlp.gate_proj.weight", ffn, hidden))
    specs.append(linear_spec(prefix + "mlp.up_proj.weight", ffn, hidden))
    specs.append(linear_spec(prefix + "mlp.down_proj.weight", hidden, ffn))
    return specs


# --- config files ----------------------------------------------------------------------------------


def _model_config(preset: ModelPreset, architecture: str, bos_id: int, eos_ids: list[int]) -> dict[str, Any]:
    """config.json as published checkpoints write it: `rope_theta` + `rope_scaling` at the top."""
    shape = {field.name: getattr(preset, field.name) for field in dataclasses.fields(preset)}
    config: dict[str, Any] = {
        **shape,
        "architectures": [ARCHITECTURES[architecture]],
        "model_type": architecture,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rope_scaling": dict(preset.rope_scaling) if preset.rope_scaling is not None else None,
        "use_cache": True,
    }
    if architecture == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif architecture == "mistral":
        config.update(sliding_window=None)  # full attention: a sliding window would cap the context
    else:
        # Qwen2 configs carry no head_dim (the model derives it); its q/k/v always have biases.
        del config["head_dim"]
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=preset.num_hidden_layers)
    return config


# --- entry points ----------------------------------------------------------------------------------


def make_model(
    out_dir: str | Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    architecture: str = "llama",
    rope_scaling: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    **overrides: Any,
) -> Path:
    """Write a Hugging Face model folder with random weights from `seed`; returns the folder."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    shape = resolve_preset(preset, rope_scaling=rope_scaling, dtype=dtype, **overrides)
    if architecture == "qwen2" and shape.head_dim * shape.num_attention_heads != shape.hidden_size:
        raise ValueError("qwen2 needs head_dim * num_attention_heads == hidden_size (its config has no head_dim)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer_files(out, shape.vocab_size, shape.max_position_embeddings)
    _write_metadata(out, shape, architecture, tokenizer)
    specs = weight_specs(shape, architecture, tokenizer.get_vocab_size())
    write_weights(out, specs, seed, DTYPES[shape.torch_dtype], max_shard_bytes)
    return out


def _write_metadata(out: Path, preset: ModelPreset, architecture: str, tokenizer: Tokenizer) -> None:
    bos_id, eos_ids = special_token_ids(tokenizer)
    write_json(out / "config.json", _model_config(preset, architecture, bos_id, eos_ids))
    write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_ids})


def add_make_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="Folder to write (created; existing model files are replaced).")
    # No argparse `choices`: make_model's ValueError gives the same one-line message to every caller.
    parser.add_argument("--preset", default="tiny",
                        help=f"Model shape: {', '.join(PRESETS)}, deepseek-v4-tiny, deepseek-v4-flash-shape.")
    parser.add_argument("--layers", type=int, default=None,
                        help="num_hidden_layers (DeepSeek-V4 presets keep the first N layers of their schedule).")
    parser.add_argument("--seed", type=int, default=0, help="Weights are a function of seed and tensor name.")
    parser.add_argument("--architecture", default="llama", help=f"One of {', '.join(ARCHITECTURES)}.")
    parser.add_argument("--rope-scaling", default=None, metavar="JSON",
                        help='As in config.json, e.g. \'{"rope_type": "linear", "factor": 2.0}\'.')  # fmt: skip
    parser.add_argument("--dtype", default=None, help=f"One of {', '.join(DTYPES)}; default: the preset's.")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                        help="Split weights into shards plus an index above this size.")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a preset field, e.g. --set num_hidden_layers=4 (repeatable).")  # fmt: skip
    parser.add_argument("--quantize", default=None, metavar="fp8",
                        help="DeepSeek-V4 presets: write DeepSeek's released layout, FP8 linears with a scale "
                             "per 128x128 block (docs/deepseek_v4.md, 'Released checkpoints').")  # fmt: skip
    parser.add_argument("--expert-dtype", default=None, metavar="fp8|fp4",
                        help="With --quantize: routed experts in FP8 (default) or FP4 (two e2m1 a byte).")
    parser.add_argument("--scale-format", default=None, metavar="ue8m0|float",
                        help="With --quantize: FP8 block scales as powers of two in one byte (ue8m0, "
                             "default) or float32.")  # fmt: skip


def _parse_rope_scaling(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--rope-scaling is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--rope-scaling must be a JSON object, got {text!r}")
    return value


def run_make_model(args: argparse.Namespace) -> Path:
    """`longctx make-model`: write the folder and print a one-line summary."""
    if args.preset.startswith(DEEPSEEK_V4_PRESET_PREFIX):
        from model_shards.deepseek_v4.presets import run_make_deepseek_v4_model

        return run_make_deepseek_v4_model(args)
    if any(value is not None for value in (args.quantize, args.expert_dtype, args.scale_format)):
        raise ValueError("--quantize, --expert-dtype and --scale-format apply to the DeepSeek-V4 presets only")
    if args.layers is not None:
        args.overrides = [*args.overrides, f"num_hidden_layers={args.layers}"]
    options = dict(rope_scaling=_parse_rope_scaling(args.rope_scaling), dtype=args.dtype,
                   **parse_overrides(args.overrides))  # fmt: skip
    out = make_model(args.out_dir, args.preset, seed=args.seed, architecture=args.architecture,
                     max_shard_bytes=args.max_shard_bytes, **options)  # fmt: skip
    millions = resolve_preset(args.preset, **options).num_parameters(args.architecture) / 1e6
    print(f"wrote {out}: {args.architecture} {args.preset}, {millions:.1f}M parameters")
    return out
