"""DeepSeek-V4's mixture of experts: routed experts (top-k or hash-routed) plus one shared expert.

Routing, per token:
  scores  = sqrtsoftplus(x @ gate^T)                   (E,)   (or sigmoid, per scoring_func)
  experts = top-k of scores + e_score_correction_bias   "moe" layers
          = tid2eid[token id]                           "hash_moe" layers (a frozen table)
  weights = scores[experts] / sum(scores[experts]) * routed_scaling_factor
Each expert (and the shared one) is a SwiGLU whose gate is clipped above and whose up projection is
clipped both ways at swiglu_limit.

Expert parallelism: rank r of the group holds experts r*E/ep .. (r+1)*E/ep - 1 and the shared
expert's r-th slice of intermediate channels. Tokens are replicated on every rank (attention is
head-parallel), so each rank runs its experts on the tokens routed to them and one all-reduce sums
routed and shared partial outputs: dispatch is a local gather, combine the all-reduce. The routed
experts run as grouped matmuls over tokens sorted by expert (grouped_experts.py): no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_folder.deepseek_v4_config import HASH_MOE, DeepseekV4Architecture
from model_folder.errors import ModelFolderError
from model_shards.deepseek_v4.block_format import BlockScaledPart
from model_shards.deepseek_v4.grouped_experts import combine, grouped_linear, sort_by_expert
from model_shards.deepseek_v4.kept_weights import DeferredParameters, KeptExperts, Projection, stack_experts
from model_shards.deepseek_v4.weights import CheckpointTensors
from model_shards.parallel.groups import ParallelGroup

_SCORE_FUNCTIONS = {"sqrtsoftplus": lambda logits: F.softplus(logits).sqrt(), "sigmoid": torch.sigmoid}


class Router(nn.Module):
    def __init__(self, arch: DeepseekV4Architecture, hashed: bool, dtype: torch.dtype):
        super().__init__()
        self.hashed, self.top_k = hashed, arch.num_experts_per_tok
        self.score = _SCORE_FUNCTIONS[arch.scoring_func]
        self.routed_scaling_factor = arch.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(arch.n_routed_experts, arch.hidden_size, dtype=dtype))
        if hashed:
            self.register_buffer("tid2eid", torch.empty(arch.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.empty(arch.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> routing weights (T, k), expert ids (T, k)."""
        scores = self.score(F.linear(x, self.weight))  # (T, E)
        if self.hashed:
            experts = self.tid2eid[input_ids]
        else:
            experts = torch.topk(scores + self.bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, experts)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, experts

    def load(self, reader: CheckpointTensors, prefix: str) -> None:
        reader.copy_into(self.weight.data, prefix + "weight")
        if self.hashed:
            reader.copy_into(self.tid2eid, prefix + "tid2eid")
        else:
            reader.copy_into(self.bias, prefix + "bias")


def clipped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


class LocalExperts(DeferredParameters):
    """This rank's experts as 3-D weights: gate|up (E_local, 2I, hidden), down (E_local, hidden, I);
    kept quantized (kept_weights.py), the same matrices as QuantizedExperts stacks."""

    def __init__(self, arch: DeepseekV4Architecture, ep: ParallelGroup, dtype: torch.dtype):
        super().__init__()
        self.ep = ep
        self.num_local = ep.split(arch.n_routed_experts, "n_routed_experts")
        self.first = ep.rank * self.num_local
        self.intermediate, self.limit = arch.moe_intermediate_size, arch.swiglu_limit
        self.gate_up = nn.Parameter(torch.empty(self.num_local, 2 * self.intermediate, arch.hidden_size,
                                                dtype=dtype))
        self.down = nn.Parameter(torch.empty(self.num_local, arch.hidden_size, self.intermediate, dtype=dtype))
        self.kept: dict[str, KeptExperts] = {}  # "gate_up", "down" when kept quantized

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Sum over each token's routed experts held here of weight * expert(x): (T, hidden)."""
        rows = sort_by_expert(experts - self.first, self.num_local)
        gate, up = self._grouped(x[rows.tokens], "gate_up", rows.offsets).split(self.intermediate, dim=-1)
        outputs = self._grouped(clipped_swiglu(gate, up, self.limit), "down", rows.offsets)  # (R, hidden)
        return combine(outputs, rows, weights, all_held=self.ep.size == 1)

    def _grouped(self, rows: torch.Tensor, matrix: str, offsets: torch.Tensor) -> torch.Tensor:
        if matrix in self.kept:
            return self.kept[matrix].grouped_linear(rows, offsets)
        return grouped_linear(rows, getattr(self, matrix), offsets)

    def load(self, reader: CheckpointTensors, prefix: str) -> None:
        for expert in range(self.num_local * self.ep.size):
            if not 0 <= expert - self.first < self.num_local:
                for matrix in ("w1", "w2", "w3"):
                    reader.held_elsewhere(f"{prefix}{expert}.{matrix}.weight")
        names = [f"{prefix}{expert}." for expert in range(self.first, self.first + self.num_local)]
        if reader.keeps(names[0] + "w1.weight"):
            self._keep(reader, names)
            return
        gate_up, down = self.allocated("gate_up"), self.allocated("down")
        for local, name in enumerate(names):
            reader.copy_into(gate_up[local, :self.intermediate], name + "w1.weight")
            reader.copy_into(gate_up[local, self.intermediate:], name + "w3.weight")
            reader.copy_into(down[local], name + "w2.weight")

    def _keep(self, reader: CheckpointTensors, names: list[str]) -> None:
        """Every local expert's w1|w3 and w2 as stored, stacked on the device."""
        parts = {matrix: [self._kept_part(reader, name + matrix + ".weight") for name in names]
                 for matrix in ("w1", "w3", "w2")}
        device = self.load_device()
        self.kept = {"gate_up": stack_experts([parts["w1"], parts["w3"]], device),
                     "down": stack_experts([parts["w2"]], device)}
        self.register_parameter("gate_up", None)
        self.register_parameter("down", None)

    @staticmethod
    def _kept_part(reader: CheckpointTensors, name: str) -> BlockScaledPart:
        if (part := reader.kept_part(name)) is None:
            raise ModelFolderError(f"{reader.folder}: tensor {name!r} has no scales, but the other experts' have")
        return part

    def kept_nbytes(self) -> int:
        return sum(experts.nbytes for experts in self.kept.values())


class SharedExpertSlice(nn.Module):
    """This rank's 1/ep of the shared expert's intermediate channels; its output is a partial sum."""

    def __init__(self, arch: DeepseekV4Architecture, ep: ParallelGroup, dtype: torch.dtype):
        super().__init__()
        self.ep, self.limit = ep, arch.swiglu_limit
        width = ep.split(arch.moe_intermediate_size, "moe_intermediate_size")
        self.gate_proj = Projection(arch.hidden_size, width, dtype)
        self.up_proj = Projection(arch.hidden_size, width, dtype)
        self.down_proj = Projection(width, arch.hidden_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(clipped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))

    def load(self, reader: CheckpointTensors, prefix: str) -> None:
        rows = dict(shard_dim=0, rank=self.ep.rank, world_size=self.ep.size)
        self.gate_proj.load(reader, prefix + "w1.weight", **rows)
        self.up_proj.load(reader, prefix + "w3.weight", **rows)
        self.down_proj.load(reader, prefix + "w2.weight", shard_dim=1, rank=self.ep.rank, world_size=self.ep.size)


class MixtureOfExperts(nn.Module):
    def __init__(self, arch: DeepseekV4Architecture, mlp_type: str, ep: ParallelGroup, dtype: torch.dtype):
        super().__init__()
        self.ep = ep
        self.gate = Router(arch, mlp_type == HASH_MOE, dtype)
        self.experts = LocalExperts(arch, ep, dtype)
        self.shared_experts = SharedExpertSlice(arch, ep, dtype)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x (T, hidden), the tokens' ids (T,) (hash routing reads them) -> (T, hidden)."""
        weights, experts = self.gate(x, input_ids)
        out = self.experts(x, weights, experts) + self.shared_experts(x)
        return self.ep.all_reduce(out)

    def load(self, reader: CheckpointTensors, prefix: str) -> None:
        self.gate.load(reader, prefix + "gate.")
        self.experts.load(reader, prefix + "experts.")
        self.shared_experts.load(reader, prefix + "shared_experts.")
