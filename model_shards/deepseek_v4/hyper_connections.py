"""Manifold-constrained hyper-connections (mHC, paper §2.2): the residual is hc_mult streams.

Around each attention and MoE block, one linear map of the (normed, flattened) streams gives
  pre  (hc,)    how the streams collapse into the block's input
  post (hc,)    how the block's output spreads back over the streams
  comb (hc, hc) how the streams mix, projected by Sinkhorn iterations onto doubly-stochastic
                matrices (rows and columns summing to 1), so deep stacks neither blow up nor fade
and the block's streams become `post * output + comb^T @ streams`. The hyper head collapses the
streams once more before the final norm. All of it runs in float32, as in transformers, and is
token-wise: chunking cannot change it. On a GPU each step is one Triton kernel (hyper_kernels.py);
the torch forms here are the reference (and the CPU path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_folder.deepseek_v4_config import DeepseekV4Architecture
from model_shards.deepseek_v4.norms import unweighted_rms_norm
from model_shards.deepseek_v4.weights import CheckpointTensors

# Below this many tokens (decode) the mixes kernel is one program looping over hc * hidden
# columns; cuBLAS's matrix-vector product spreads that work over the GPU.
FUSED_MIXES_MIN_TOKENS = 64


class HyperConnection(nn.Module):
    def __init__(self, arch: DeepseekV4Architecture):
        super().__init__()
        self.hc, self.iterations = arch.hc_mult, arch.hc_sinkhorn_iters
        self.hc_eps, self.norm_eps = arch.hc_eps, arch.rms_norm_eps
        outputs = (2 + self.hc) * self.hc  # pre, post, comb
        self.fn = nn.Parameter(torch.empty(outputs, self.hc * arch.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(outputs, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams (T, hc, hidden) -> post (T, hc), comb (T, hc, hc) float32, and the collapsed
        block input (T, hidden) in the streams' dtype."""
        return self.fused(streams) if fused_kernels_run(streams) else self.reference(streams)

    def fused(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from model_shards.deepseek_v4 import hyper_kernels

        mixes = stream_mixes(streams, self.fn, self.norm_eps)
        pre, post, comb = hyper_kernels.hyper_weights(mixes, self.base, self.scale, self.hc, self.iterations,
                                                      self.hc_eps)
        return post, comb, hyper_kernels.collapse(pre, streams)

    def reference(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hc = self.hc
        mixes = stream_mixes_torch(streams, self.fn, self.norm_eps)
        pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.split([hc, hc, hc * hc])
        pre_scale, post_scale, comb_scale = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_scale + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_scale + post_b)
        comb = torch.softmax(comb_w.view(-1, hc, hc) * comb_scale + comb_b.view(hc, hc), dim=-1) + self.hc_eps
        comb = self._sinkhorn(comb)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        return post, comb, collapsed

    def _sinkhorn(self, comb: torch.Tensor) -> torch.Tensor:
        """Alternate column and row normalisation (columns first and last), as transformers does."""
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.iterations - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        return comb

    def load(self, reader: CheckpointTensors, prefix: str) -> None:
        for name in ("fn", "base", "scale"):
            reader.copy_into(getattr(self, name).data, f"{prefix}_{name}")


def stream_mixes(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """(T, hc, hidden) -> (T, N) float32: fn applied to the RMS-normed, flattened streams."""
    if fused_kernels_run(streams) and streams.shape[0] >= FUSED_MIXES_MIN_TOKENS:
        from model_shards.deepseek_v4 import hyper_kernels

        return hyper_kernels.stream_mixes(streams, fn, eps)
    return stream_mixes_torch(streams, fn, eps)


def stream_mixes_torch(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    return F.linear(unweighted_rms_norm(streams.flatten(1).float(), eps), fn)


def fused_kernels_run(streams: torch.Tensor) -> bool:
    """On a GPU with hc a power of two, mHC runs as Triton kernels (hyper_kernels.py)."""
    hc = streams.shape[1]
    return streams.is_cuda and hc & (hc - 1) == 0 and streams.is_contiguous()


def mix_streams(streams: torch.Tensor, block_output: torch.Tensor, post: torch.Tensor,
                comb: torch.Tensor) -> torch.Tensor:
    """post * output + comb^T @ streams: (T, hc, hidden), in the streams' dtype."""
    if fused_kernels_run(streams):
        from model_shards.deepseek_v4 import hyper_kernels

        return hyper_kernels.mix(streams, block_output, post, comb)
    return mix_streams_reference(streams, block_output, post, comb)


def mix_streams_reference(streams: torch.Tensor, block_output: torch.Tensor, post: torch.Tensor,
                          comb: torch.Tensor) -> torch.Tensor:
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * block_output.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2),
                                                                                    streams)


class HyperHead(nn.Module):
    """The final collapse of the streams into one hidden state (T, hidden)."""

    def __init__(self, arch: DeepseekV4Architecture):
        super().__init__()
        self.eps, self.norm_eps = arch.hc_eps, arch.rms_norm_eps
        self.fn = nn.Parameter(torch.empty(arch.hc_mult, arch.hc_mult * arch.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(arch.hc_mult, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return self.fused(streams) if fused_kernels_run(streams) else self.reference(streams)

    def fused(self, streams: torch.Tensor) -> torch.Tensor:
        from model_shards.deepseek_v4 import hyper_kernels

        mixes = stream_mixes(streams, self.fn, self.norm_eps)
        pre = torch.sigmoid(mixes * self.scale + self.base) + self.eps  # (T, hc)
        return hyper_kernels.collapse(pre, streams)

    def reference(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = stream_mixes_torch(streams, self.fn, self.norm_eps)
        pre = torch.sigmoid(mixes * self.scale + self.base) + self.eps  # (T, hc)
        return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)

    def load(self, reader: CheckpointTensors, prefix: str) -> None:
        for name in ("fn", "base", "scale"):
            reader.copy_into(getattr(self, name).data, f"{prefix}_{name}")
