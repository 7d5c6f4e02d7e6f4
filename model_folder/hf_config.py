"""Read a Hugging Face `config.json` into the one frozen description of a model that longctx uses.

Only decoder-only Llama-family models with exact full attention are served: Llama 2/3/3.1/3.2,
Mistral (without a sliding window that could bind) and Qwen2/2.5. Defaults for absent keys are
those of the transformers config classes, so that a folder means the same thing here as there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_folder.deepseek_v4_config import DeepseekV4Architecture, parse_deepseek_v4_config
from model_folder.errors import ModelFolderError
from model_folder.rope_scaling import RopeScaling

# config.json "architectures" entry -> our name
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

DEEPSEEK_V4_ARCHITECTURE = "DeepseekV4ForCausalLM"

# max_position_embeddings when config.json leaves it out (the transformers class defaults)
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}
_DEFAULT_ROPE_THETA = 10000.0
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
_SCALED_ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
# rope_type -> (optional keys, required keys) that the method reads, besides the original length
_ROPE_KEYS = {
    "linear": (set(), {"factor"}),
    "dynamic": (set(), {"factor"}),
    "yarn": ({"factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"},
             set()),
    "llama3": (set(), {"factor", "low_freq_factor", "high_freq_factor"}),
}


@dataclass(frozen=True)
class ModelArchitecture:
    """Everything about a model's shape and numerics that the forward pass depends on."""

    architecture: str  # llama | mistral | qwen2
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    o_proj_bias: bool  # Llama's attention_bias also puts a bias on o_proj; Qwen2's does not
    mlp_bias: bool
    torch_dtype: str | None  # as written in config.json ("bfloat16", ...), None if absent
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # A window >= max_position_embeddings is accepted; attention is exact full attention only
    # while a context stays within it (HF masks older keys beyond it).
    sliding_window: int | None = None

    @property
    def kv_block_multiple(self) -> int:
        """Block sizes must be a multiple of this (dense KV: any size)."""
        return 1

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of all fields.

        It identifies the architecture, not the weights: two fine-tunes of one base model share
        it, so a KV-cache key must also name the checkpoint."""
        canonical = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def tensor_parallel_sizes(self) -> list[int]:
        """Every TP size that splits this model: it divides the query heads and the MLP, and the
        KV heads divide by it or it by them (then each KV head is replicated on tp / KV ranks).
        The vocabulary never limits it: the embedding and LM head are padded."""
        return [tp for tp in range(1, self.num_attention_heads + 1)
                if not self.num_attention_heads % tp and not self.intermediate_size % tp
                and (not self.num_key_value_heads % tp or not tp % self.num_key_value_heads)]

    def check_tensor_parallel(self, tp: int) -> None:
        """A one-line ValueError naming the valid sizes when `tp` cannot split this model."""
        valid = self.tensor_parallel_sizes()
        if tp not in valid:
            raise ValueError(
                f"tensor parallel size {tp} cannot split this model ({self.num_attention_heads} attention heads, "
                f"{self.num_key_value_heads} KV heads, intermediate_size {self.intermediate_size}); "
                f"valid sizes: {', '.join(map(str, valid))}")


def load_architecture(folder: str | Path) -> ModelArchitecture | DeepseekV4Architecture:
    """Parse `folder/config.json`; raise ModelFolderError naming the file or key that is wrong.
    DeepSeek-V4 folders get their own description (model_folder/deepseek_v4_config.py)."""
    config = _read_config(Path(folder) / "config.json")
    if config.get("architectures") == [DEEPSEEK_V4_ARCHITECTURE] or config.get("model_type") == "deepseek_v4":
        return parse_deepseek_v4_config(config)
    architecture = _architecture_name(config)
    for key in _REQUIRED_KEYS:
        if config.get(key) is None:
            raise ModelFolderError(f"config.json: required key {key!r} is missing")
    if config.get("hidden_act", "silu") != "silu":
        raise ModelFolderError(f"config.json: hidden_act {config['hidden_act']!r} is not supported "
                               "(only 'silu')")
    max_positions = int(config.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[architecture]))
    rope_theta, rope_scaling = _rope_settings(config, max_positions)
    return ModelArchitecture(
        architecture=architecture,
        **_shape_fields(config),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        **_bias_fields(config, architecture),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_eos_ids(config.get("eos_token_id")),
        sliding_window=_sliding_window(config, architecture, max_positions),
    )


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"{path}: config.json is missing from the model folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelFolderError(f"{path}: config.json is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path}: config.json must hold a JSON object")
    return config


def _architecture_name(config: dict[str, Any]) -> str:
    """From "architectures"; a config without it (as saved from a bare config object) is read by
    its "model_type", as transformers' AutoModelForCausalLM does."""
    names = config.get("architectures")
    if not names and config.get("model_type") in SUPPORTED_ARCHITECTURES.values():
        return config["model_type"]
    if not names or len(names) != 1 or names[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelFolderError(
            f"config.json: architectures {names!r} (model_type {config.get('model_type')!r}) is "
            f"not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    return SUPPORTED_ARCHITECTURES[names[0]]


def _shape_fields(config: dict[str, Any]) -> dict[str, int]:
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    if heads % kv_heads:
        raise ModelFolderError(f"config.json: num_attention_heads ({heads}) is not a multiple of "
                               f"num_key_value_heads ({kv_heads})")
    return {"vocab_size": int(config["vocab_size"]), "hidden_size": int(config["hidden_size"]),
            "intermediate_size": int(config["intermediate_size"]),
            "num_hidden_layers": int(config["num_hidden_layers"]),
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim}


def _bias_fields(config: dict[str, Any], architecture: str) -> dict[str, bool]:
    if architecture == "qwen2":
        return {"attention_bias": True, "o_proj_bias": False, "mlp_bias": False}
    if architecture == "mistral":
        return {"attention_bias": False, "o_proj_bias": False, "mlp_bias": False}
    attention_bias = bool(config.get("attention_bias", False))
    return {"attention_bias": attention_bias, "o_proj_bias": attention_bias,
            "mlp_bias": bool(config.get("mlp_bias", False))}


def _eos_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _sliding_window(config: dict[str, Any], architecture: str, max_positions: int) -> int | None:
    """The window HF would apply, or None; a window that could bind within the model's length
    would make attention differ from full attention, which is all we serve."""
    if architecture == "llama":
        return None
    if architecture == "qwen2":
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
    else:
        window = config.get("sliding_window", 4096)  # MistralConfig's default when absent
    if window is not None and int(window) < max_positions:
        raise ModelFolderError(
            f"config.json: sliding_window={window} is smaller than max_position_embeddings="
            f"{max_positions}; longctx serves exact full attention only (set sliding_window to null)")
    return None if window is None else int(window)


def _rope_settings(config: dict[str, Any], max_positions: int) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from the classic `rope_scaling` + `rope_theta` keys or transformers 5
    `rope_parameters` (theta inside). As in transformers, a non-empty rope_scaling wins."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    if not isinstance(params, dict):
        raise ModelFolderError(f"config.json: {key} must be an object")
    theta = float(params.get("rope_theta", config.get("rope_theta", _DEFAULT_ROPE_THETA)))
    if float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ModelFolderError(f"config.json: {key}.partial_rotary_factor other than 1 is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in _SCALED_ROPE_TYPES:
        raise ModelFolderError(f"config.json: {key}.rope_type {rope_type!r} is not supported; "
                               f"supported: default, {', '.join(_SCALED_ROPE_TYPES)}")
    return theta, _scaling(params, rope_type, key, config, max_positions)


def _scaling(params: dict[str, Any], rope_type: str, key: str, config: dict[str, Any],
             max_positions: int) -> RopeScaling:
    """Only the keys the method reads are kept, so stray keys cannot change the fingerprint."""
    optional, required = _ROPE_KEYS[rope_type]
    for name in sorted(required):
        if params.get(name) is None:
            raise ModelFolderError(f"config.json: {key}.{name} is required for rope_type "
                                   f"{rope_type!r}")
    values = {name: float(params[name]) for name in optional | required
              if params.get(name) is not None}
    if rope_type not in ("yarn", "llama3"):
        return RopeScaling(rope_type=rope_type, **values)
    original = int(config.get("original_max_position_embeddings")
                   or params.get("original_max_position_embeddings") or max_positions)
    if rope_type == "llama3":
        return RopeScaling(rope_type=rope_type, original_max_position_embeddings=original, **values)
    if "factor" not in params:
        raise ModelFolderError(f"config.json: {key}.factor is required for rope_type 'yarn'")
    values.setdefault("factor", max_positions / original)  # transformers' reading of a null
    # transformers reads .get("truncate", True): absent means True, an explicit null False
    return RopeScaling(rope_type=rope_type, original_max_position_embeddings=original,
                       truncate=bool(params.get("truncate", True)), **values)
