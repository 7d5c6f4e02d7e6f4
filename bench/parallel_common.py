"""Shared by the phases of bench/parallel.py: model shapes, the shaped random model, GPU timing,
FLOP counts, and the large-shape check of fused attention kernels."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model_folder.hf_config import load_architecture
from model_shards.llama import LlamaForCausalLM
from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.lse_attention import KERNELS, reference_attention, select_kernel
from parallel_probes import new_event, synchronize

BLOCK_SIZE = 256  # SP=2: 128 positions of every block per GPU


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int


LLAMA3_8B = Shape(heads=32, kv_heads=8, head_dim=128, hidden=4096, ffn=14336, vocab=128256)
DRY_RUN = Shape(heads=4, kv_heads=2, head_dim=16, hidden=64, ffn=128, vocab=1024)


def cuda_time(fn, repeats: int = 1) -> float:
    """Seconds per call on the GPU clock (CUDA events), after the host waited for the GPU."""
    synchronize()
    start, stop = new_event(), new_event()
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    synchronize()
    return start.elapsed_time(stop) / 1e3 / repeats


def causal_flops(shape: Shape, length: int) -> float:
    """QK^T and PV over the causal half: 2 matmuls x 2 flops x L(L+1)/2 pairs x heads x head_dim."""
    return 4.0 * shape.heads * shape.head_dim * length * (length + 1) / 2


def shaped_model(shape: Shape, layers: int, device: torch.device, backend,
                 tp: ParallelGroup | None = None) -> LlamaForCausalLM:
    """A Llama with `shape` and `layers` layers (this TP rank's share of it), random weights made
    on the device (no folder)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": shape.vocab,
              "hidden_size": shape.hidden, "intermediate_size": shape.ffn, "num_hidden_layers": layers,
              "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
              "max_position_embeddings": 1 << 21, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    with tempfile.TemporaryDirectory(prefix="longctx-bench-config-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        arch = load_architecture(folder)
    model = LlamaForCausalLM(arch, torch.bfloat16, device, backend, tp)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.fill_(1.0)  # norm weights
            else:
                std = 1.0 if "embed" in name else parameter.shape[1] ** -0.5
                parameter.normal_(0.0, std)
    return model.eval()


def shape_of(model: LlamaForCausalLM) -> Shape:
    arch = model.arch
    return Shape(arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim, arch.hidden_size,
                 arch.intermediate_size, arch.vocab_size)


def set_backend(model: LlamaForCausalLM, backend) -> None:
    for layer in model.layers:
        layer.self_attn.backend = backend


def release_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def slowest(group: ParallelGroup, fn) -> float:
    """Seconds of one call of a collective `fn`, started together (barrier), on the slowest rank."""
    dist.barrier(group=group.process_group)
    seconds = cuda_time(fn)
    return max(group.all_gather(torch.tensor([seconds], dtype=torch.float64, device=group.device)).tolist())


def agreed(group: ParallelGroup, name: str) -> str:
    """Rank 0's kernel choice on every rank: a collective op must run the same kernel everywhere."""
    names = list(KERNELS)
    return names[group.broadcast_ints([names.index(name)] if group.rank == 0 else None, 1)[0]]


def large_shape_check(name: str, shape: Shape, rows: int, device) -> dict:
    """Does kernel `name` still match the reference with `rows` queries (over 16 keys) and over
    `rows` keys (for 16 queries)? Fused kernels have had 32-bit offset bugs past 2^31 elements
    (a 512K-token q of 32 x 128 is exactly 2^31) that the small probe cannot see; this costs
    milliseconds, where checking a causal call at that size would cost seconds."""
    kernel, scale, few = KERNELS[name], shape.head_dim ** -0.5, 16
    generator = torch.Generator(device=device).manual_seed(0)

    def tensor(count, heads):
        return torch.randn(count, heads, shape.head_dim, device=device, dtype=torch.bfloat16, generator=generator)
    big_q, small_k, small_v = tensor(rows, shape.heads), tensor(few, shape.kv_heads), tensor(few, shape.kv_heads)
    spread = torch.arange(0, rows, max(1, rows // 64), device=device)  # rows across the tensor, and its end
    picked = torch.cat([spread, torch.arange(rows - 8, rows, device=device)])
    out = kernel(big_q, small_k, small_v, scale, False)[0][picked]
    errors = [(out.float() - reference_attention(big_q[picked], small_k, small_v, scale, False)[0].float()).abs().max()]
    del big_q
    small_q, big_k, big_v = tensor(few, shape.heads), tensor(rows, shape.kv_heads), tensor(rows, shape.kv_heads)
    out, lse = kernel(small_q, big_k, big_v, scale, False)
    ref_out, ref_lse = reference_attention(small_q, big_k, big_v, scale, False)
    errors += [(out.float() - ref_out.float()).abs().max(), (lse - ref_lse).abs().max()]
    worst = max(e.item() for e in errors)
    return {"kernel": name, "rows": rows, "max_error": worst, "ok": worst < 0.05}


def checked_kernel(shape: Shape, rows: int, device, checks: list) -> str:
    """The prefill kernel chosen for `shape` (the heads one GPU attends with), replaced by
    FlashAttention-2 if it fails the large-shape check at `rows` queries (see large_shape_check)."""
    name = select_kernel(device, torch.bfloat16, shape.heads, shape.kv_heads, shape.head_dim)[0]
    if rows < 1 << 18 or device.type != "cuda":
        return name
    for candidate in dict.fromkeys([name, "flash"]):
        check = large_shape_check(candidate, shape, rows, device)
        checks.append(check)
        if check["ok"]:
            return candidate
    return "flash"  # failed too: the run reports its error rather than silently using the reference
