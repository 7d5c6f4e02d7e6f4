"""`longctx make-model --preset deepseek-v4-* --quantize fp8`: DeepSeek's released checkpoint layout.

DeepSeek's own tensor names (no `model.` prefix), FP8 linears with per-128x128-block scales
(`X.scale`), routed experts FP8 or FP4 (int8 pairs, one ue8m0 scale per 32 inputs of a row), the
rest unquantized in the preset's dtype, plus one multi-token-prediction layer (`mtp.0.*`, which
serving skips). Which linears carry scales follows V4-Flash: attention (wq_a, wq_b, wkv, wo_a, wo_b),
the indexer's wq_b, shared and routed experts, the MTP projections; the compressors' and the
indexer's other projections ship in BF16 (transformers' DeepseekV4 `_keep_in_fp32_modules`), and
so do the embedding, head and router.

Every quantized dimension of the tiny preset is a multiple of 128 or smaller than 128 (the
largest, wq_b's rows, is 4 heads x 32 = 128): transformers' dequantizer derives the block from the
grid (rows // grid rows), which equals DeepSeek's ceil semantics only then, and the tests compare
with transformers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch

from model_folder.deepseek_v4_config import DeepseekV4Architecture
from model_folder.deepseek_v4_quantization import FP4, UE8M0, BlockQuantization
from model_shards.deepseek_v4.block_format import quantize_fp4, quantize_fp8
from model_shards.random_checkpoint import TensorSpec, linear_spec, norm_spec

_QUANTIZED = re.compile(r"(\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|\.ffn\.(shared_experts|experts\.\d+)\.w[123]"
                        r"|^mtp\.\d+\.[eh]_proj)\.weight$")


def released_config(config: dict[str, Any], quantization: BlockQuantization) -> dict[str, Any]:
    """config.json as V4-Flash writes it: quantization_config, and expert_dtype at the top level."""
    block = list(quantization.weight_block)
    settings = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block,
                "scale_fmt": quantization.scale_format}
    return {**config, "quantization_config": settings, "expert_dtype": quantization.expert_format}


def mtp_specs(arch: DeepseekV4Architecture, layer_specs: list[TensorSpec]) -> list[TensorSpec]:
    """One MTP layer: a copy of the last layer's tensors under `mtp.0.` and its own projections."""
    last = f"layers.{arch.num_hidden_layers - 1}."
    hidden = arch.hidden_size
    return [*(TensorSpec("mtp.0." + s.name.removeprefix(last), s.shape, s.std, s.mean, s.unused_rows, s.dtype)
              for s in layer_specs if s.name.startswith(last)),
            linear_spec("mtp.0.e_proj.weight", hidden, hidden), linear_spec("mtp.0.h_proj.weight", hidden, hidden),
            norm_spec("mtp.0.enorm.weight", hidden), norm_spec("mtp.0.hnorm.weight", hidden),
            norm_spec("mtp.0.norm.weight", hidden)]


class ReleasedTensors:
    """The stored tensors of canonical-named float specs: a quantized weight becomes its values
    and its scales (two specs, written one after the other), anything else stays one spec."""

    def __init__(self, quantization: BlockQuantization, tensor_for: Callable[[TensorSpec], torch.Tensor]):
        self.quantization, self.tensor_for = quantization, tensor_for
        self._source: dict[str, tuple[TensorSpec, int]] = {}  # stored name -> (float spec, 0 values / 1 scales)
        self._last: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # (float spec name, quantized)

    def specs(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        stored = []
        for spec in specs:
            if not _QUANTIZED.search(spec.name):
                stored.append(spec)
                continue
            fp4 = self._fp4(spec)
            rows, cols = spec.shape
            block = self.quantization.block_of(fp4)
            grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
            one_byte_scales = fp4 or self.quantization.scale_format == UE8M0
            scale = spec.name.removesuffix("weight") + "scale"
            self._source.update({spec.name: (spec, 0), scale: (spec, 1)})
            stored += [TensorSpec(spec.name, (rows, cols // 2) if fp4 else (rows, cols), 0.0,
                                  dtype=torch.int8 if fp4 else torch.float8_e4m3fn),
                       TensorSpec(scale, grid, 0.0, dtype=torch.float8_e8m0fnu if one_byte_scales else torch.float32)]
        return stored

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        if spec.name not in self._source:
            return self.tensor_for(spec)
        source, role = self._source[spec.name]
        if self._last is None or self._last[0] != source.name:
            self._last = (source.name, self._quantize(source))
        return self._last[1][role]

    def _fp4(self, spec: TensorSpec) -> bool:
        return ".ffn.experts." in spec.name and self.quantization.expert_format == FP4

    def _quantize(self, spec: TensorSpec) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.tensor_for(spec)
        if self._fp4(spec):
            return quantize_fp4(weight)
        return quantize_fp8(weight, self.quantization.weight_block, self.quantization.scale_format == UE8M0)
