"""Read a DeepSeek-V4 `config.json` into one frozen description, as transformers 5 reads it.

`transformers.DeepseekV4Config.__post_init__` is the specification followed here, legacy keys
included: `compress_ratios` (per-layer 0 / CSA rate / HCA rate), `compress_rate_csa`,
`compress_rate_hca`, `num_hash_layers`, `qk_rope_head_dim`, and the classic `rope_scaling` +
`rope_theta` keys next to transformers 5's nested `rope_parameters = {"main": ..., "compress": ...}`.
Defaults for absent keys are that class's defaults (the DeepSeek-V4-Flash shape).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from model_folder.deepseek_v4_quantization import parse_block_quantization
from model_folder.errors import ModelFolderError
from model_folder.rope_scaling import RopeScaling

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE, MOE = "hash_moe", "moe"
MLP_LAYER_TYPES = (HASH_MOE, MOE)
SCORING_FUNCTIONS = ("sqrtsoftplus", "sigmoid")

# DeepseekV4Config's class defaults (the V4-Flash shape), for keys a config.json leaves out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
    "num_attention_heads": 64, "head_dim": 512, "q_lora_rank": 1024, "num_experts_per_tok": 6,
    "n_routed_experts": 256, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5,
    "max_position_embeddings": 1048576, "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1.0e-6, "swiglu_limit": 10.0, "sliding_window": 128, "o_groups": 8,
    "o_lora_rank": 1024, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "rms_norm_eps": 1.0e-6,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
}  # fmt: skip
DEFAULT_COMPRESS_RATES = {CSA: 4, HCA: 128}
# Legacy per-layer `compress_ratios` name a layer type by these fixed values (whatever compress_rates say).
_LEGACY_RATIO_TYPES = {0: SLIDING, 4: CSA, 128: HCA}
DEFAULT_NUM_HASH_LAYERS = 3
DEFAULT_PARTIAL_ROTARY_FACTOR = 64 / 512


@dataclass(frozen=True)
class RopeSpec:
    """One of V4's two rotary embeddings ("main": sliding layers; "compress": CSA/HCA layers, their
    compressors and the indexer). It rotates the trailing `rotary_dim` channels of a head."""

    theta: float
    rotary_dim: int
    scaling: RopeScaling | None = None  # yarn only; None: plain RoPE


@dataclass(frozen=True)
class DeepseekV4Architecture:
    """Everything about a DeepSeek-V4 model's shape and numerics that its forward depends on."""

    architecture: str  # always "deepseek_v4"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int  # the one shared K=V head and every query head
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    layer_types: tuple[str, ...]
    compress_rates: tuple[tuple[str, int], ...]  # ((CSA, m), (HCA, m')), as a frozen mapping
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    mlp_layer_types: tuple[str, ...]
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int  # routed experts and the shared expert
    scoring_func: str
    routed_scaling_factor: float
    swiglu_limit: float
    rms_norm_eps: float
    main_rope: RopeSpec
    compress_rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str | None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def compress_rate(self, layer_type: str) -> int:
        """Source tokens per compressed entry of a CSA or HCA layer."""
        return dict(self.compress_rates)[layer_type]

    @property
    def kv_block_multiple(self) -> int:
        """A KV block must hold whole compression windows of every layer type: then each block
        boundary closes them all, nothing is pending there, and a cached prefix resumes from its
        blocks alone (model_shards/deepseek_v4/kv_pages.py)."""
        return math.lcm(*(rate for _, rate in self.compress_rates))

    def tensor_parallel_sizes(self) -> list[int]:
        """TP sizes that split query heads, output groups, indexer heads, experts (expert
        parallelism over the same ranks) and the shared expert's channels evenly."""
        split = (self.num_attention_heads, self.o_groups, self.index_n_heads, self.n_routed_experts,
                 self.moe_intermediate_size)
        return [tp for tp in range(1, self.o_groups + 1) if all(count % tp == 0 for count in split)]

    def check_tensor_parallel(self, tp: int) -> None:
        """A one-line ValueError naming the valid sizes when `tp` cannot split this model."""
        if tp not in (valid := self.tensor_parallel_sizes()):
            raise ValueError(f"tensor parallel size {tp} cannot split this DeepSeek-V4 model ({self.o_groups} output "
                             f"groups, {self.n_routed_experts} experts); valid sizes: {', '.join(map(str, valid))}")

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of all fields (identifies the architecture, not weights)."""
        canonical = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_deepseek_v4_config(config: dict[str, Any]) -> DeepseekV4Architecture:
    """config.json's object -> the architecture; ModelFolderError names the key that is wrong."""
    parse_block_quantization(config)  # checked here, at start-up; the weight loader applies it
    value = _Reader(config)
    layers = value.int("num_hidden_layers")
    compress_rates = _compress_rates(config)
    partial_factor = _partial_rotary_factor(config, value.int("head_dim"))
    main_rope, compress_rope = _rope_specs(config, value, partial_factor)
    architecture = DeepseekV4Architecture(
        architecture="deepseek_v4",
        **{name: value.int(name) for name in _INT_FIELDS},
        layer_types=_layer_types(config, layers),
        compress_rates=tuple(sorted(compress_rates.items())),
        **{name: value.float(name) for name in _FLOAT_FIELDS},
        mlp_layer_types=_mlp_layer_types(config, layers),
        scoring_func=_scoring_func(config),
        main_rope=main_rope,
        compress_rope=compress_rope,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        bos_token_id=value.optional_int("bos_token_id"),
        eos_token_ids=_eos_ids(config.get("eos_token_id", DEFAULTS["eos_token_id"])),
    )
    _check_shapes(architecture)
    return architecture


_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
               "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
               "hc_mult", "hc_sinkhorn_iters", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
               "max_position_embeddings")  # fmt: skip
_FLOAT_FIELDS = ("hc_eps", "routed_scaling_factor", "swiglu_limit", "rms_norm_eps")


class _Reader:
    """Typed reads of config keys with DeepseekV4Config's defaults."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def _raw(self, name: str) -> Any:
        value = self.config.get(name)
        return DEFAULTS[name] if value is None else value

    def int(self, name: str) -> int:
        value = self._raw(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelFolderError(f"config.json: {name} must be a positive integer, got {value!r}")
        return value

    def float(self, name: str) -> float:
        value = self._raw(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelFolderError(f"config.json: {name} must be a number, got {value!r}")
        return float(value)

    def optional_int(self, name: str) -> int | None:
        value = self.config.get(name, DEFAULTS.get(name))
        return None if value is None else int(value)


def _compress_rates(config: dict[str, Any]) -> dict[str, int]:
    rates = dict(config.get("compress_rates") or DEFAULT_COMPRESS_RATES)
    for layer_type, legacy_key in ((CSA, "compress_rate_csa"), (HCA, "compress_rate_hca")):
        if config.get(legacy_key) is not None:
            rates[layer_type] = config[legacy_key]
    if set(rates) != {CSA, HCA} or any(not isinstance(rate, int) or rate < 1 for rate in rates.values()):
        raise ModelFolderError(f"config.json: compress_rates must give a positive integer for {CSA!r} and "
                               f"{HCA!r}, got {rates!r}")
    return rates


def _layer_types(config: dict[str, Any], layers: int) -> tuple[str, ...]:
    """Explicit `layer_types` > legacy per-layer `compress_ratios` > V4's default schedule
    (two HCA layers, then CSA / HCA alternating)."""
    types = config.get("layer_types")
    if types is None and config.get("compress_ratios") is not None:
        unknown = [ratio for ratio in config["compress_ratios"] if ratio not in _LEGACY_RATIO_TYPES]
        if unknown:
            raise ModelFolderError(f"config.json: compress_ratios entries must be 0, 4 or 128, got {unknown[0]!r}")
        types = [_LEGACY_RATIO_TYPES[ratio] for ratio in config["compress_ratios"]]
    if types is None:
        types = [HCA] * min(layers, 2) + [CSA if i % 2 else HCA for i in range(max(layers - 2, 0))]
    return _checked_schedule("layer_types", types[:layers], layers, LAYER_TYPES)


def _mlp_layer_types(config: dict[str, Any], layers: int) -> tuple[str, ...]:
    types = config.get("mlp_layer_types")
    if types is None:
        hash_layers = config.get("num_hash_layers")
        hash_layers = DEFAULT_NUM_HASH_LAYERS if hash_layers is None else int(hash_layers)
        types = [HASH_MOE] * min(layers, hash_layers) + [MOE] * max(0, layers - hash_layers)
    return _checked_schedule("mlp_layer_types", types[:layers], layers, MLP_LAYER_TYPES)


def _checked_schedule(name: str, types: list[str], layers: int, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if len(types) != layers:
        raise ModelFolderError(f"config.json: {name} has {len(types)} entries for {layers} layers")
    if bad := [t for t in types if t not in allowed]:
        raise ModelFolderError(f"config.json: {name} entries must be one of {allowed}, got {bad[0]!r}")
    return tuple(types)


def _scoring_func(config: dict[str, Any]) -> str:
    name = config.get("scoring_func") or DEFAULTS["scoring_func"]
    if name not in SCORING_FUNCTIONS:
        raise ModelFolderError(f"config.json: scoring_func {name!r} is not supported; supported: {SCORING_FUNCTIONS}")
    if config.get("hidden_act", "silu") != "silu":
        raise ModelFolderError(f"config.json: hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
    return name


def _partial_rotary_factor(config: dict[str, Any], head_dim: int) -> float:
    """The explicit field, else legacy qk_rope_head_dim / head_dim, else 64 / 512."""
    if config.get("partial_rotary_factor") is not None:
        return float(config["partial_rotary_factor"])
    if config.get("qk_rope_head_dim") is not None:
        return config["qk_rope_head_dim"] / head_dim
    return DEFAULT_PARTIAL_ROTARY_FACTOR


def _rope_specs(config: dict[str, Any], value: _Reader, partial_factor: float) -> tuple[RopeSpec, RopeSpec]:
    """Already nested (as transformers 5 saves it): each label as written, a missing
    partial_rotary_factor meaning the whole head (transformers' reading). Otherwise main is plain
    RoPE at rope_theta and compress takes the flat rope_scaling / rope_parameters (YaRN) at
    compress_rope_theta, with attention_factor 1 unless given."""
    nested = config.get("rope_parameters") or {}
    head_dim, max_positions = value.int("head_dim"), value.int("max_position_embeddings")
    if isinstance(nested.get("main"), dict) and isinstance(nested.get("compress"), dict):
        return tuple(_rope_spec(nested[label], f"rope_parameters.{label}", head_dim, 1.0, config, max_positions)
                     for label in ("main", "compress"))  # type: ignore[return-value]
    flat = {k: v for k, v in (config.get("rope_scaling") or nested).items() if k not in ("main", "compress")}
    main = {"rope_type": "default", "rope_theta": value.float("rope_theta")}
    compress = {**flat, "rope_theta": value.float("compress_rope_theta")}
    compress.setdefault("rope_type", compress.get("type", "default"))
    if compress["rope_type"] == "yarn":
        compress.setdefault("attention_factor", 1.0)
    return (_rope_spec(main, "rope_theta", head_dim, partial_factor, config, max_positions),
            _rope_spec(compress, "rope_scaling", head_dim, partial_factor, config, max_positions))


def _rope_spec(params: dict[str, Any], key: str, head_dim: int, default_factor: float, config: dict[str, Any],
               max_positions: int) -> RopeSpec:
    rope_type = params.get("rope_type", params.get("type", "default"))
    factor = float(params.get("partial_rotary_factor", default_factor))
    rotary_dim = int(head_dim * factor)
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ModelFolderError(f"config.json: {key} gives {rotary_dim} rotary dims for head_dim {head_dim}; "
                               "need an even number from 2 to head_dim")
    theta = float(params.get("rope_theta", DEFAULTS["rope_theta"]))
    if rope_type == "default":
        return RopeSpec(theta, rotary_dim)
    if rope_type != "yarn":
        raise ModelFolderError(f"config.json: {key} rope_type {rope_type!r} is not supported (default or yarn)")
    return RopeSpec(theta, rotary_dim, _yarn(params, key, config, max_positions))


def _yarn(params: dict[str, Any], key: str, config: dict[str, Any], max_positions: int) -> RopeScaling:
    original = int(params.get("original_max_position_embeddings")
                   or config.get("original_max_position_embeddings") or max_positions)
    factor = params.get("factor")
    if factor is None:
        raise ModelFolderError(f"config.json: {key}.factor is required for rope_type 'yarn'")
    optional = {name: float(params[name]) for name in ("attention_factor", "beta_fast", "beta_slow", "mscale",
                                                       "mscale_all_dim") if params.get(name) is not None}
    # transformers reads `truncate` from the top-level rope_parameters, which for V4 holds only
    # "main" and "compress": the nested value is never seen and the default (True) always applies.
    return RopeScaling(rope_type="yarn", factor=float(factor), original_max_position_embeddings=original,
                       truncate=True, **optional)


def _eos_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _check_shapes(arch: DeepseekV4Architecture) -> None:
    if arch.num_attention_heads % arch.o_groups:
        raise ModelFolderError(f"config.json: num_attention_heads={arch.num_attention_heads} is not divisible "
                               f"by o_groups={arch.o_groups}")
    if arch.num_experts_per_tok > arch.n_routed_experts:
        raise ModelFolderError(f"config.json: num_experts_per_tok={arch.num_experts_per_tok} exceeds "
                               f"n_routed_experts={arch.n_routed_experts}")
    if not math.isfinite(arch.swiglu_limit) or arch.swiglu_limit <= 0:
        raise ModelFolderError(f"config.json: swiglu_limit must be a positive number, got {arch.swiglu_limit}")
