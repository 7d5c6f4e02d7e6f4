"""DeepSeek's released checkpoint format: config.json's `quantization_config`, validated.

DeepSeek-V3 and V4 publish their weights quantized; V4-Flash's config.json says

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
    "expert_dtype": "fp4"

(V4.1 and transformers' FineGrainedFP8Config put `expert_dtype` inside quantization_config: both
are read). The tensors: each quantized linear `X.weight` is float8_e4m3fn with one scale per
128 x 128 block in `X.scale` (transformers saves it as `X.weight_scale_inv`), a grid of
(ceil(rows / 128), ceil(cols / 128)); routed experts in FP4 are int8 holding two e2m1 values per
byte (low nibble first) with one scale per 32 input columns of each row. Scales are float32
("float") or one byte each, a power of two 2 ** (byte - 127) ("ue8m0"). Embeddings, head, router,
norms, mHC, sinks and the compressor / indexer-compressor projections have no scale and are stored
in bf16 / float32. Loading (model_shards/deepseek_v4/quantized_weights.py) dequantizes every
scaled weight; "dynamic" activation quantization is a property of FP8 GEMMs, which dequantized
weights do not use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_folder.errors import ModelFolderError

FP8, FP4 = "fp8", "fp4"
UE8M0, FLOAT = "ue8m0", "float"
FP4_BLOCK = (1, 32)  # one scale per 32 input columns of a row (MXFP4's layout)
_KNOWN_KEYS = ("quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt", "expert_dtype",
               "modules_to_not_convert", "modules_to_convert", "dequantize")


@dataclass(frozen=True)
class BlockQuantization:
    """How a DeepSeek checkpoint stores its quantized linears (FP8 blocks; FP8 or FP4 experts)."""

    weight_block: tuple[int, int] = (128, 128)  # (rows, columns) sharing one scale of an FP8 weight
    scale_format: str = FLOAT  # FP8 weights' scales: "float" (float32) or "ue8m0" (one byte, a power of two)
    expert_format: str = FP8  # routed experts: "fp8" like every other linear, or "fp4"

    def block_of(self, fp4: bool) -> tuple[int, int]:
        return FP4_BLOCK if fp4 else self.weight_block


def parse_block_quantization(config: dict[str, Any]) -> BlockQuantization | None:
    """config.json's object -> its quantization (None: an unquantized folder). Every field is
    checked; ModelFolderError names the one that is wrong."""
    settings = config.get("quantization_config")
    if not settings:
        if config.get("expert_dtype") not in (None, FP8):
            raise ModelFolderError(f"config.json: expert_dtype {config['expert_dtype']!r} needs a "
                                   "quantization_config (quant_method 'fp8')")
        return None
    if not isinstance(settings, dict):
        raise ModelFolderError(f"config.json: quantization_config must be an object, got {settings!r}")
    if unknown := sorted(set(settings) - set(_KNOWN_KEYS)):
        raise ModelFolderError(f"config.json: quantization_config.{unknown[0]} is not supported "
                               f"(known keys: {', '.join(_KNOWN_KEYS)})")
    _require(settings, "quant_method", ("fp8",), "DeepSeek's block-scaled FP8", optional=False)
    _require(settings, "fmt", ("e4m3",), "float8_e4m3fn weights")
    _require(settings, "activation_scheme", ("dynamic",), "static activation scales are not supported")
    _check_module_lists(settings)
    return BlockQuantization(weight_block=_weight_block(settings.get("weight_block_size")),
                             scale_format=_require(settings, "scale_fmt", (FLOAT, UE8M0), "") or FLOAT,
                             expert_format=_expert_format(config, settings))


def read_block_quantization(folder: str | Path) -> BlockQuantization | None:
    """The quantization of a model folder's config.json (read by the weight loader)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path}: cannot be read ({error})") from error
    return parse_block_quantization(config)


def _require(settings: dict[str, Any], key: str, allowed: tuple[str, ...], why: str, *,
             optional: bool = True) -> str | None:
    value = settings.get(key)
    if value is None and optional:
        return None
    if value not in allowed:
        reason = f"; {why}" if why else ""
        raise ModelFolderError(f"config.json: quantization_config.{key} {value!r} is not supported "
                               f"(supported: {', '.join(map(repr, allowed))}{reason})")
    return value


def _weight_block(value: Any) -> tuple[int, int]:
    if value is None:
        return BlockQuantization.weight_block
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in value)):
        raise ModelFolderError(f"config.json: quantization_config.weight_block_size must be two positive "
                               f"integers, got {value!r}")
    return value[0], value[1]


def _expert_format(config: dict[str, Any], settings: dict[str, Any]) -> str:
    """Inside quantization_config (V4.1, transformers) or top-level (V4-Flash); both must agree."""
    inner, outer = settings.get("expert_dtype"), config.get("expert_dtype")
    if inner is not None and outer is not None and inner != outer:
        raise ModelFolderError(f"config.json: expert_dtype {outer!r} and quantization_config.expert_dtype "
                               f"{inner!r} disagree")
    value = inner if inner is not None else outer
    if value not in (None, FP8, FP4):
        raise ModelFolderError(f"config.json: expert_dtype {value!r} is not supported (supported: 'fp8', 'fp4')")
    return value or FP8


def _check_module_lists(settings: dict[str, Any]) -> None:
    """modules_to_not_convert is informative (a weight without a scale tensor loads as stored);
    modules_to_convert (quantized embeddings) is not supported."""
    skipped = settings.get("modules_to_not_convert")
    if skipped is not None and (not isinstance(skipped, list) or not all(isinstance(m, str) for m in skipped)):
        raise ModelFolderError(f"config.json: quantization_config.modules_to_not_convert must be a list of "
                               f"module names, got {skipped!r}")
    if settings.get("modules_to_convert"):
        raise ModelFolderError("config.json: quantization_config.modules_to_convert (quantized embeddings) "
                               "is not supported")
    if not isinstance(settings.get("dequantize", False), bool):
        raise ModelFolderError(f"config.json: quantization_config.dequantize must be true or false, "
                               f"got {settings['dequantize']!r}")
