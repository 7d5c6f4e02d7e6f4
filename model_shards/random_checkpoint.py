"""Deterministic random checkpoints: tensor values, streamed safetensors files and tokenizer files.

Shared by the Llama-family presets (make_model.py) and DeepSeek-V4's (deepseek_v4/presets.py), so it
sits below both: make_model.py dispatches to the V4 presets, which build on these writers.

Random weights are scaled so that a model's next-token distribution is peaked (logit std about
4, typical top-1 / top-2 gaps well above float32 noise): greedy outputs are then stable under
reordered float32 arithmetic, which token-by-token comparisons against transformers need.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from model_folder.tokenizer_training import BOS_TOKEN, CHAT_TEMPLATE, END_OF_TEXT_TOKEN, EOT_TOKEN, SPECIAL_TOKENS, \
    trained_tokenizer_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                           torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.int8: "I8"}

# Initialisation. Untied embedding rows and every projection output have unit-scale entries, so
# each layer moves the residual stream as much as the token embedding does (otherwise a random
# model mostly echoes its current token). The output matrix has unit-norm rows and the final norm's
# weights are about LOGIT_STD, which makes the logits' std LOGIT_STD: a peaked distribution.
EMBEDDING_STD = 1.0
NORM_WEIGHT_SPREAD = 0.1  # norm weights are mean * (1 + N(0, 0.1^2)): a lost norm weight shows
BIAS_STD = 0.1  # larger q/k biases made random Qwen2 models fall into one-token loops more often
LOGIT_STD = 4.0
# A tied matrix is also the embedding: rows of norm 0.25 (final norm weights 4x larger to keep the
# logit scale) keep the current token's own row from winning the next step, as it did at norm 1:
# 5 of 24 greedy runs of tied tiny models repeated one token, 0 of 24 at 0.25.
TIED_ROW_NORM = 0.25
# Special-token and padding rows of the output matrix are shrunk so that a random model practically
# never emits them: greedy runs last their full length and always decode to text.
UNUSED_ROW_SCALE = 0.05


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0
    unused_rows: tuple[int, int] | None = None  # (first id, count of ids) never emitted: see UNUSED_ROW_SCALE
    dtype: torch.dtype | None = None  # stored dtype when not the checkpoint's (an integer table)


def norm_spec(name: str, size: int, mean: float = 1.0) -> TensorSpec:
    return TensorSpec(name, (size,), NORM_WEIGHT_SPREAD * mean, mean=mean)


def linear_spec(name: str, out_features: int, in_features: int) -> TensorSpec:
    # std 1/sqrt(fan_in) keeps unit-scale inputs at unit scale (torch Linear layout: out x in).
    return TensorSpec(name, (out_features, in_features), 1.0 / math.sqrt(in_features))


def make_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The float32 values of one tensor; they depend only on (seed, name), not on write order."""
    digest = hashlib.sha256(f"{seed}/{spec.name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    values = torch.randn(spec.shape, generator=generator, dtype=torch.float32).mul_(spec.std).add_(spec.mean)
    if spec.unused_rows is not None:
        first, count = spec.unused_rows
        values[first : first + count] *= UNUSED_ROW_SCALE
    return values


# --- safetensors, streamed ---------------------------------------------------------------------


def _plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors packed greedily; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    shard_bytes = 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(spec)
        shard_bytes += nbytes
    return shards


def _safetensors_header(specs: list[TensorSpec], dtype: torch.dtype) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        stored = spec.dtype or dtype
        end = offset + math.prod(spec.shape) * torch.empty((), dtype=stored).element_size()
        header[spec.name] = {"dtype": SAFETENSORS_DTYPE_NAMES[stored], "shape": list(spec.shape),
                             "data_offsets": [offset, end]}  # fmt: skip
        offset = end
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors(path: Path, specs: list[TensorSpec], tensor_for: Callable[[TensorSpec], torch.Tensor],
                      dtype: torch.dtype) -> None:  # fmt: skip
    """Write the header from the shapes first, then one tensor at a time: memory holds one tensor."""
    with open(path, "wb") as file:
        file.write(_safetensors_header(specs, dtype))
        for spec in specs:
            tensor = tensor_for(spec).to(spec.dtype or dtype).contiguous()
            file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def write_weights(out_dir: Path, specs: list[TensorSpec], seed: int, dtype: torch.dtype, max_shard_bytes: int,
                  tensor_for: Callable[[TensorSpec], torch.Tensor] | None = None) -> int:
    """Write model.safetensors, or shards and their index; returns the number of files. Values
    come from `tensor_for` (default: make_tensor with `seed`)."""
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(specs, itemsize, max_shard_bytes)
    tensor_for = tensor_for or functools.partial(make_tensor, seed=seed)
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", specs, tensor_for, dtype)
        return 1
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / file_name, shard, tensor_for, dtype)
        weight_map.update({spec.name: file_name for spec in shard})
    total_size = sum(math.prod(spec.shape) for spec in specs) * itemsize
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    write_json(out_dir / "model.safetensors.index.json", index)
    return len(shards)


# --- tokenizer files -------------------------------------------------------------------------------------

def _tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict[str, Any]:
    added_tokens = {
        str(tokenizer.token_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }  # fmt: skip
    return {
        "added_tokens_decoder": added_tokens,
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer_files(out: Path, vocab_size: int, model_max_length: int) -> Tokenizer:
    """tokenizer.json (trained here), tokenizer_config.json with the chat template, and
    special_tokens_map.json; returns the tokenizer."""
    tokenizer_json = trained_tokenizer_json(vocab_size)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    (out / "tokenizer.json").write_text(tokenizer_json)
    write_json(out / "tokenizer_config.json", _tokenizer_config(tokenizer, model_max_length))
    write_json(out / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOT_TOKEN})
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> tuple[int, list[int]]:
    """(bos id, eos ids) of a tokenizer from `write_tokenizer_files`."""
    return tokenizer.token_to_id(BOS_TOKEN), [tokenizer.token_to_id(END_OF_TEXT_TOKEN), tokenizer.token_to_id(EOT_TOKEN)]


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n")



def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings; values are JSON (numbers, true/false) or else plain strings."""
    overrides = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    return overrides
