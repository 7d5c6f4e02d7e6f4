"""`longctx make-model --preset deepseek-v4-*`: DeepSeek-V4 folders with random weights.

- deepseek-v4-tiny: test shapes (sliding window 8, CSA every 4 tokens with a top-4 indexer, HCA
  every 16, one pure sliding layer, hash-MoE and MoE layers, mHC with 2 streams, YaRN on the
  compress RoPE). The weights go through transformers itself: written here, loaded by
  `DeepseekV4ForCausalLM.from_pretrained` (which must find every tensor and no other), and saved by
  its `save_pretrained`, so the folder is exactly what transformers writes.
- deepseek-v4-flash-shape: DeepSeek-V4-Flash's per-layer shapes (DeepseekV4Config's defaults,
  YaRN x16 on the compress RoPE), bf16, its first `layers` layers. Far too large for transformers to
  hold: tensors are streamed to safetensors shards one at a time, under the names save_pretrained
  uses, and config.json is written directly (no transformers needed, e.g. on a GPU machine). 43 layers with 256 experts is about 280B parameters; `--set n_routed_experts=16` shrinks it.

Random weights are scaled as in model_shards/make_model.py (unit-scale activations, peaked logits):
with transformers' 0.02 initialisation a tiny V4 repeats one token forever.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model_folder.tokenizer_training import SPECIAL_TOKENS
from model_folder.deepseek_v4_config import CSA, HASH_MOE, HCA, MOE, SLIDING, DeepseekV4Architecture, \
    parse_deepseek_v4_config
from model_folder.deepseek_v4_quantization import FLOAT, FP4, FP8, UE8M0, BlockQuantization
from model_shards.deepseek_v4.released_checkpoint import ReleasedTensors, mtp_specs, released_config
from model_shards.deepseek_v4.weights import transformers_name
from model_shards.random_checkpoint import DTYPES, LOGIT_STD, TensorSpec, linear_spec, make_tensor, norm_spec, \
    parse_overrides, special_token_ids, write_tokenizer_files, write_weights

COMPRESS_YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                 "beta_fast": 32.0, "beta_slow": 1.0}
PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v4-tiny": dict(
        vocab_size=1024, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        head_dim=32, partial_rotary_factor=0.5, q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=4,
        num_experts_per_tok=2, sliding_window=8, compress_rates={CSA: 4, HCA: 16}, index_n_heads=16,
        index_head_dim=16, index_topk=4, hc_mult=2, max_position_embeddings=65536,
        layer_types=[SLIDING, CSA, HCA, CSA], mlp_layer_types=[HASH_MOE, MOE, MOE, MOE],
        rope_parameters={**COMPRESS_YARN, "factor": 4.0, "original_max_position_embeddings": 16384},
        torch_dtype="float32"),
    "deepseek-v4-flash-shape": dict(num_hidden_layers=43, rope_parameters=COMPRESS_YARN, torch_dtype="bfloat16"),
}  # fmt: skip
FLASH_LAYERS = 43


def run_make_deepseek_v4_model(args: argparse.Namespace) -> Path:
    """`longctx make-model --preset deepseek-v4-...`: write the folder, print a one-line summary."""
    if args.architecture != "llama" or args.rope_scaling is not None:
        raise ValueError("--architecture and --rope-scaling do not apply to DeepSeek-V4 presets "
                         "(use --set rope_parameters=... to change the compress RoPE)")
    overrides = parse_overrides(args.overrides)
    quantization = quantization_of_flags(args.quantize, args.expert_dtype, args.scale_format)
    out = make_deepseek_v4_model(args.out_dir, args.preset, seed=args.seed, layers=args.layers, dtype=args.dtype,
                                 max_shard_bytes=args.max_shard_bytes, quantization=quantization, **overrides)
    arch = parse_deepseek_v4_config(preset_config(args.preset, layers=args.layers, dtype=args.dtype, **overrides))
    stored = "" if quantization is None else f", FP8 with {quantization.expert_format} experts"
    print(f"wrote {out}: deepseek_v4 {args.preset}, {arch.num_hidden_layers} layers, "
          f"{num_parameters(arch) / 1e6:.1f}M parameters{stored}")
    return out


def quantization_of_flags(quantize: str | None, expert_dtype: str | None,
                          scale_format: str | None) -> BlockQuantization | None:
    """--quantize fp8 [--expert-dtype fp8|fp4] [--scale-format ue8m0|float] -> the folder's format."""
    if quantize is None:
        if expert_dtype is not None or scale_format is not None:
            raise ValueError("--expert-dtype and --scale-format need --quantize fp8")
        return None
    for flag, value, allowed in (("--quantize", quantize, (FP8,)), ("--expert-dtype", expert_dtype or FP8, (FP8, FP4)),
                                 ("--scale-format", scale_format or UE8M0, (UE8M0, FLOAT))):
        if value not in allowed:
            raise ValueError(f"{flag} {value!r} is not supported; choose one of {', '.join(allowed)}")
    return BlockQuantization(scale_format=scale_format or UE8M0, expert_format=expert_dtype or FP8)


def make_deepseek_v4_model(out_dir: str | Path, preset: str, *, seed: int = 0, layers: int | None = None,
                           dtype: str | None = None, max_shard_bytes: int = 4 << 30,
                           quantization: BlockQuantization | None = None, **overrides: Any) -> Path:
    """Write the folder; returns it. `overrides` are DeepseekV4Config keys. With `quantization`,
    DeepSeek's released layout (released_checkpoint.py) instead of transformers' bf16 / float32 one."""
    config = preset_config(preset, layers=layers, dtype=dtype, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = parse_deepseek_v4_config(config)
    tokenizer = write_tokenizer_files(out, arch.vocab_size, arch.max_position_embeddings)
    config["bos_token_id"], config["eos_token_id"] = special_token_ids(tokenizer)
    specs = canonical_specs(arch, tokenizer.get_vocab_size())
    tensor_for = functools.partial(v4_tensor, seed=seed, arch=arch)
    if quantization is not None:
        released = ReleasedTensors(quantization, tensor_for)
        _write_directly(out, released_config(config, quantization), released.specs(specs + mtp_specs(arch, specs)),
                        released.tensor, max_shard_bytes)
    elif preset == "deepseek-v4-tiny":
        _save_through_transformers(out, config, _transformers_named(specs), tensor_for)
    else:
        _write_directly(out, config, _transformers_named(specs), tensor_for, max_shard_bytes)
    return out


def _write_directly(out: Path, config: dict[str, Any], specs: list[TensorSpec],
                    tensor_for: Callable[[TensorSpec], torch.Tensor], max_shard_bytes: int) -> None:
    """config.json as written here (keys left out mean DeepseekV4Config's defaults): no transformers needed."""
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_weights(out, specs, 0, DTYPES[config["torch_dtype"]], max_shard_bytes, tensor_for)


def preset_config(preset: str, *, layers: int | None = None, dtype: str | None = None,
                  **overrides: Any) -> dict[str, Any]:
    """The config.json content (before token ids) of a preset with its overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = dict(PRESETS[preset])  # keys left out take DeepseekV4Config's defaults, here and in transformers
    if layers is not None:
        config.update(_first_layers(config, layers))
    if dtype is not None:
        config["torch_dtype"] = dtype
    config.update(overrides)
    config["architectures"], config["model_type"] = ["DeepseekV4ForCausalLM"], "deepseek_v4"
    if config["torch_dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config['torch_dtype']!r}")
    return config


def _first_layers(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """The first `layers` layers of the preset's schedule (the flash shape's 43-layer one)."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if config.get("layer_types") is not None and layers > len(config["layer_types"]):
        raise ValueError(f"layers={layers} exceeds the preset's {len(config['layer_types'])} layers")
    full = parse_deepseek_v4_config({**config, "num_hidden_layers": max(layers, config["num_hidden_layers"])})
    return {"num_hidden_layers": layers, "layer_types": list(full.layer_types[:layers]),
            "mlp_layer_types": list(full.mlp_layer_types[:layers])}


def _hf_config(config: dict[str, Any]):
    try:
        from transformers import DeepseekV4Config
    except ImportError as error:  # transformers comes with the test extra
        raise ValueError("writing a DeepSeek-V4 folder needs transformers>=5.25 (pip install -e '.[test]')") \
            from error
    settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_config = DeepseekV4Config(**settings)
    hf_config.architectures = ["DeepseekV4ForCausalLM"]
    hf_config.dtype = config.get("torch_dtype", "float32")
    return hf_config


def _save_through_transformers(out: Path, config: dict[str, Any], specs: list[TensorSpec],
                               tensor_for: Callable[[TensorSpec], torch.Tensor]) -> None:
    """Stage the tensors, have transformers load every one of them (and nothing else), save."""
    from transformers import DeepseekV4ForCausalLM

    with tempfile.TemporaryDirectory() as staging:
        _hf_config(config).save_pretrained(staging)
        write_weights(Path(staging), specs, 0, DTYPES[config["torch_dtype"]], 1 << 40, tensor_for)
        model, info = DeepseekV4ForCausalLM.from_pretrained(staging, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value and key != "error_msgs"}
    if problems:
        raise RuntimeError(f"transformers did not load the DeepSeek-V4 tensors as written: {problems}")
    model.save_pretrained(out)


# --- tensors ----------------------------------------------------------------------------------------


def weight_specs(arch: DeepseekV4Architecture, tokenizer_vocab: int | None = None) -> list[TensorSpec]:
    """Every checkpoint tensor with transformers' saved name, its shape and random scale."""
    return _transformers_named(canonical_specs(arch, tokenizer_vocab))


def _transformers_named(specs: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(transformers_name(s.name), s.shape, s.std, s.mean, s.unused_rows, s.dtype) for s in specs]


def canonical_specs(arch: DeepseekV4Architecture, tokenizer_vocab: int | None = None) -> list[TensorSpec]:
    """Every checkpoint tensor with DeepSeek's name, its shape and random scale."""
    hidden, hc = arch.hidden_size, arch.hc_mult
    unused_rows = None
    if tokenizer_vocab is not None:
        first_special = tokenizer_vocab - len(SPECIAL_TOKENS)
        unused_rows = (first_special, arch.vocab_size - first_special)
    specs = [TensorSpec("embed.weight", (arch.vocab_size, hidden), 1.0)]
    for index in range(arch.num_hidden_layers):
        specs += _layer_specs(arch, index, f"layers.{index}.")
    specs += _hyper_specs("hc_head", hc, hc * hidden, with_weights=False)
    specs.append(norm_spec("norm.weight", hidden, LOGIT_STD))
    specs.append(TensorSpec("head.weight", (arch.vocab_size, hidden), hidden ** -0.5, unused_rows=unused_rows))
    return specs


def _hyper_specs(prefix: str, outputs: int, inputs: int, with_weights: bool = True) -> list[TensorSpec]:
    scales = 3 if with_weights else 1
    return [TensorSpec(f"{prefix}_fn", (outputs, inputs), inputs ** -0.5), TensorSpec(f"{prefix}_base", (outputs,), 0.5),
            TensorSpec(f"{prefix}_scale", (scales,), 0.1, mean=1.0)]


def _layer_specs(arch: DeepseekV4Architecture, index: int, prefix: str) -> list[TensorSpec]:
    hidden, hc, head_dim = arch.hidden_size, arch.hc_mult, arch.head_dim
    heads, groups = arch.num_attention_heads, arch.o_groups
    attn = prefix + "attn."
    specs = [*_hyper_specs(prefix + "hc_attn", (2 + hc) * hc, hc * hidden),
             *_hyper_specs(prefix + "hc_ffn", (2 + hc) * hc, hc * hidden),
             norm_spec(prefix + "attn_norm.weight", hidden), norm_spec(prefix + "ffn_norm.weight", hidden),
             linear_spec(attn + "wq_a.weight", arch.q_lora_rank, hidden), norm_spec(attn + "q_norm.weight", arch.q_lora_rank),
             linear_spec(attn + "wq_b.weight", heads * head_dim, arch.q_lora_rank),
             linear_spec(attn + "wkv.weight", head_dim, hidden), norm_spec(attn + "norm.weight", head_dim),
             linear_spec(attn + "wo_a.weight", groups * arch.o_lora_rank, heads * head_dim // groups),
             linear_spec(attn + "wo_b.weight", hidden, groups * arch.o_lora_rank),
             TensorSpec(attn + "attn_sink", (heads,), 1.0)]
    layer_type = arch.layer_types[index]
    if layer_type != SLIDING:
        specs += _compressor_specs(attn + "compressor.", hidden, head_dim, arch.compress_rate(layer_type),
                                   layer_type == CSA)
    if layer_type == CSA:
        specs += [*_compressor_specs(attn + "indexer.compressor.", hidden, arch.index_head_dim,
                                     arch.compress_rate(CSA), True),
                  linear_spec(attn + "indexer.wq_b.weight", arch.index_n_heads * arch.index_head_dim, arch.q_lora_rank),
                  linear_spec(attn + "indexer.weights_proj.weight", arch.index_n_heads, hidden)]
    return specs + _moe_specs(arch, arch.mlp_layer_types[index], prefix + "ffn.")


def _compressor_specs(prefix: str, hidden: int, dim: int, rate: int, overlapping: bool) -> list[TensorSpec]:
    width = 2 * dim if overlapping else dim
    return [linear_spec(prefix + "wkv.weight", width, hidden), linear_spec(prefix + "wgate.weight", width, hidden),
            TensorSpec(prefix + "ape", (rate, width), 0.5), norm_spec(prefix + "norm.weight", dim)]


def _moe_specs(arch: DeepseekV4Architecture, mlp_type: str, prefix: str) -> list[TensorSpec]:
    hidden, inner, experts = arch.hidden_size, arch.moe_intermediate_size, arch.n_routed_experts
    specs = [linear_spec(prefix + "gate.weight", experts, hidden)]
    if mlp_type == HASH_MOE:
        specs.append(TensorSpec(prefix + "gate.tid2eid", (arch.vocab_size, arch.num_experts_per_tok), 0.0,
                                dtype=torch.int64))
    else:
        specs.append(TensorSpec(prefix + "gate.bias", (experts,), 0.1))
    for expert in [*(f"experts.{e}." for e in range(experts)), "shared_experts."]:
        specs += [linear_spec(prefix + expert + "w1.weight", inner, hidden),
                  linear_spec(prefix + expert + "w2.weight", hidden, inner),
                  linear_spec(prefix + expert + "w3.weight", inner, hidden)]
    return specs


def v4_tensor(spec: TensorSpec, seed: int, arch: DeepseekV4Architecture) -> torch.Tensor:
    """make_tensor's values, except the hash-routing table: distinct random experts per token."""
    if spec.dtype != torch.int64:
        return make_tensor(spec, seed)
    digest = hashlib.sha256(f"{seed}/{spec.name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    scores = torch.rand(arch.vocab_size, arch.n_routed_experts, generator=generator)
    return scores.argsort(dim=-1)[:, :arch.num_experts_per_tok]  # (vocab, k) distinct per row


def num_parameters(arch: DeepseekV4Architecture) -> int:
    return sum(math.prod(spec.shape) for spec in weight_specs(arch))
