"""DeepSeek-V4 checkpoint tensor names, as DeepSeek publishes them and as transformers saves them.

transformers 5 loads V4 through a renaming table (`conversion_mapping.py`, "deepseek_v4") and
saves back to DeepSeek's own names, under a `model.` prefix, except three top-level tensors it
keeps under its own names. Both spellings are accepted here; the model asks for DeepSeek's names
without prefix (`layers.0.attn.wq_a.weight`, `layers.0.ffn.experts.3.w1.weight`, ...):

    transformers' save_pretrained        DeepSeek's checkpoint     here (canonical)
    model.embed_tokens.weight            embed.weight              embed.weight
    head.weight                          head.weight               head.weight
    model.hc_head.hc_fn                  hc_head_fn                hc_head_fn
    model.layers.0.attn.wkv.weight       layers.0.attn.wkv.weight  layers.0.attn.wkv.weight

The multi-token-prediction layers (`mtp.*`) are not used for serving and are skipped.

Released checkpoints are quantized (model_folder/deepseek_v4_quantization.py): a weight with a
scale tensor (`X.scale`, or transformers' `X.weight_scale_inv`; canonical here: `X.scale`) is
dequantized into its parameter (quantized_weights.py), or kept as stored (`kept_part`,
model.quantized_weights: keep); a weight stored in FP8 / FP4 without one
is an error, never a silent cast.
"""

from __future__ import annotations

import torch

from model_folder.deepseek_v4_quantization import read_block_quantization
from model_folder.errors import ModelFolderError
from model_shards.deepseek_v4.block_format import BlockScaledPart
from model_shards.deepseek_v4.quantized_weights import QUANTIZED_STORAGE, BlockScaledReader
from model_shards.weights import WeightReader

_ALIASES = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
_SKIPPED_PREFIXES = ("mtp.",)


_TRANSFORMERS_SCALE = ".weight_scale_inv"


def canonical_name(name: str) -> str:
    name = name.removeprefix("model.")
    if name.endswith(_TRANSFORMERS_SCALE):
        return name.removesuffix(_TRANSFORMERS_SCALE) + ".scale"
    return _ALIASES.get(name, name)


def scale_name(weight: str) -> str | None:
    """The canonical name of a weight's block scales (None for tensors that are not `.weight`)."""
    return weight.removesuffix(".weight") + ".scale" if weight.endswith(".weight") else None


def is_routed_expert(name: str) -> bool:
    return ".ffn.experts." in name


def transformers_name(canonical: str) -> str:
    """The spelling transformers' save_pretrained gives a canonical name."""
    if canonical == "head.weight":
        return canonical
    saved = {alias: name for name, alias in _ALIASES.items()}.get(canonical, canonical)
    return "model." + saved


class CheckpointTensors:
    """A WeightReader addressed by canonical names; it remembers which it handed out."""

    def __init__(self, reader: WeightReader, keep_quantized: bool = False):
        self.reader, self.keep_quantized = reader, keep_quantized
        self.folder = reader.folder
        quantization = read_block_quantization(reader.folder)
        self.block_scaled = BlockScaledReader(reader, quantization) if quantization else None
        self._actual: dict[str, str] = {}
        self._elsewhere: set[str] = set()
        for name in reader.names():
            canonical = canonical_name(name)
            if canonical in self._actual:
                raise ModelFolderError(f"{reader.folder}: tensors {self._actual[canonical]!r} and {name!r} "
                                       "are the same weight spelled twice")
            self._actual[canonical] = name

    def has(self, name: str) -> bool:
        return name in self._actual

    def copy_into(self, destination: torch.Tensor, name: str, *, shard_dim: int | None = None, rank: int = 0,
                  world_size: int = 1) -> None:
        """Check the shape, then copy (and cast, or dequantize) this rank's part of tensor `name`
        into destination."""
        shard = dict(shard_dim=shard_dim, rank=rank, world_size=world_size)
        if (scale := self._scale_of(name)) is not None:
            self.block_scaled.copy_into(destination, self._actual_name(name), scale, expert=is_routed_expert(name),
                                        **shard)
            return
        self.reader.copy_into(destination, self._unscaled(name), **shard)

    def keeps(self, name: str) -> bool:
        """Weight `name` stays quantized: the model keeps weights so and this one has scales."""
        return self.keep_quantized and self._scale_of(name) is not None

    def kept_part(self, name: str, *, shard_dim: int | None = None, rank: int = 0,
                  world_size: int = 1) -> BlockScaledPart | None:
        """This rank's part of weight `name` as stored (host memory), when the model keeps weights
        quantized and this one has block scales; else None (load it by copy_into)."""
        if not self.keeps(name):
            return None
        return self.block_scaled.read_kept(self._actual_name(name), self._scale_of(name), expert=is_routed_expert(name),
                                           shard_dim=shard_dim, rank=rank, world_size=world_size)

    def copy_rows_into(self, destination: torch.Tensor, name: str, start: int, stop: int) -> None:
        """Rows start .. stop-1 of tensor `name` (those that exist) into destination's first rows."""
        self.reader.copy_rows_into(destination, self._unscaled(name), start, stop)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(self._actual_name(name))

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(self._actual_name(name))

    def held_elsewhere(self, name: str) -> None:
        """Tensor `name` (and its scales) exists but belongs to another rank (an expert of expert
        parallelism)."""
        self._elsewhere.add(self._actual_name(name))
        if (scale := self._scale_of(name)) is not None:
            self._elsewhere.add(scale)

    def unused(self) -> list[str]:
        """Checkpoint tensors nobody read or placed on another rank (the mtp layers are skipped)."""
        return [name for name in self.reader.unread()
                if name not in self._elsewhere and not canonical_name(name).startswith(_SKIPPED_PREFIXES)]

    def _scale_of(self, name: str) -> str | None:
        """The stored name of weight `name`'s scales in a quantized folder, if it has any."""
        scale = scale_name(name)
        if self.block_scaled is None or scale not in self._actual:
            return None
        return self._actual[scale]

    def _unscaled(self, name: str) -> str:
        """The stored name of a tensor read as stored; FP8 / FP4 storage without scales is refused."""
        actual = self._actual_name(name)
        if (stored := self.reader.stored_dtype(actual)) in QUANTIZED_STORAGE:
            raise ModelFolderError(f"{self.folder}: tensor {actual!r} is stored as {stored} but has no scale tensor "
                                   f"(expected {scale_name(name)!r} and a quantization_config in config.json)")
        return actual

    def _actual_name(self, name: str) -> str:
        if name not in self._actual:
            raise ModelFolderError(f"{self.folder}: tensor {name!r} (or model.{name}) is missing from the checkpoint")
        return self._actual[name]
