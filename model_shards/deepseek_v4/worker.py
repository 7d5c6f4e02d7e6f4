"""A DeepSeek-V4 worker on one rank: the model, its two page pools and the runner, behind the
same face as the dense ModelWorker (description, kv_layout, execute, close), so that every
executor hosts it unchanged (model_shards/rank.py picks the worker by architecture)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from cluster.config import LongctxConfig
from model_folder.deepseek_v4_config import DeepseekV4Architecture
from model_folder.hf_config import load_architecture
from model_shards.deepseek_v4.decode_graphs import DeepseekV4DecodeGraphs
from model_shards.deepseek_v4.kernel_choices import KernelChoices
from model_shards.deepseek_v4.kernel_warmup import warm_up_runner
from model_shards.deepseek_v4.kv_tiers import HybridKVTransfer
from model_shards.deepseek_v4.kv_pages import PagePool, compressed_layout, plan_pool_sizes, window_layout
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.deepseek_v4.runner import DeepseekV4Runner
from model_shards.device import resolve_device, resolve_dtype
from model_shards.kv_io.rank_agreement import RankAgreement
from model_shards.parallel.groups import ParallelLayout
from model_shards.structured_output import GrammarCompiler
from protocol.kv_fingerprint import kv_fingerprint
from protocol.kv_transfer_ops import KVTransferReport
from protocol.step import StepInput, StepOutput
from protocol.worker_description import WorkerDescription

ACTIVATION_RESERVE_BYTES = 2 << 30  # GPU memory kept for a step's activations beside weights and pages


class DeepseekV4Worker:
    def __init__(self, config: LongctxConfig, layout: ParallelLayout | None = None,
                 device: torch.device | None = None):
        self.config = config
        self.layout = layout or ParallelLayout.single()
        self.architecture: DeepseekV4Architecture = load_architecture(config.model.path)
        self.device = device or resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.architecture, self.device)
        self.block_size = config.cache.resolved_block_size(self.architecture.kv_block_multiple)
        # keep: the pools below get the memory the bf16 copies would have taken (model.weight_nbytes)
        self.model = DeepseekV4ForCausalLM.from_folder(config.model.path, dtype=self.dtype, device=self.device,
                                                       tp=self.layout.tp,
                                                       keep_quantized=config.model.quantized_weights == "keep",
                                                       kernels=kernel_choices(config))
        # decode steps as CUDA graphs (decode_graphs.py) on one GPU rank: one scratch block a pool
        self.graph_max_batch = min(config.model.cuda_graph_max_batch, config.scheduler.max_num_seqs)
        if self.device.type != "cuda" or self.layout.world.size > 1:
            self.graph_max_batch = 0
        self.scratch_blocks = 1 if self.graph_max_batch else 0
        self.pages = self._allocate_pages()
        self.grammars = GrammarCompiler(config.model.path, self.architecture.vocab_size)
        decode_graphs = self._decode_graphs()
        self.runner = DeepseekV4Runner(self.model, self.pages, self.layout, self.grammars, decode_graphs,
                                       config.parallel.sequence_split_min_tokens)
        if self.device.type == "cuda":  # Triton kernels compile now, not in the first requests
            warm_up_runner(self.runner)  # engine steps on pages that hold nothing yet
        if decode_graphs is not None:
            decode_graphs.capture(decode_graphs.start_keys())
        # Host and Redis tiers (None without them); Redis keys under this layout's fingerprint.
        fingerprint = kv_fingerprint(self.architecture.fingerprint(), self.kv_layout)
        self.kv_transfer = HybridKVTransfer.create_for(config, self.pages, fingerprint)
        self.rank_agreement = RankAgreement()  # used with several ranks only

    def _allocate_pages(self) -> PagedKV:
        arch, cache, scheduler = self.architecture, self.config.cache, self.config.scheduler
        compressed = compressed_layout(arch, self.block_size, self.dtype)
        window = window_layout(arch, self.block_size, self.dtype)
        sizes = plan_pool_sizes(arch, self.block_size, self._budget_bytes(), compressed.nbytes, window.nbytes,
                                scheduler.max_num_seqs, scheduler.max_tokens_per_step, cache.num_device_blocks)
        world = self.layout.world  # one block id space: every rank the same counts
        compressed_blocks, window_blocks = world.min_int(sizes.compressed_blocks), world.min_int(sizes.window_blocks)
        if min(compressed_blocks, window_blocks) < 1:
            raise RuntimeError(f"no memory left for the KV pages ({compressed.nbytes} + {window.nbytes} bytes a block)")
        return PagedKV(PagePool(compressed, compressed_blocks + self.scratch_blocks, self.device),
                       PagePool(window, window_blocks + self.scratch_blocks, self.device), self.block_size)

    def _decode_graphs(self) -> DeepseekV4DecodeGraphs | None:
        """The decode graphs, their scratch the last block of each pool (never given to a request:
        `description` reports the pools without it)."""
        if not self.graph_max_batch:
            return None
        max_model_len = self.config.model.max_model_len or self.architecture.max_position_embeddings
        scratch = (self.pages.compressed.num_blocks - 1, self.pages.window.num_blocks - 1)
        return DeepseekV4DecodeGraphs(self.model, self.pages, scratch, self.graph_max_batch, max_model_len,
                                      self.config.scheduler.max_num_seqs)

    def _budget_bytes(self) -> int:
        if self.device.type != "cuda":
            return self.config.cache.cpu_kv_bytes
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free - total * (1 - self.config.cache.device_memory_fraction) - ACTIVATION_RESERVE_BYTES)

    @property
    def description(self) -> WorkerDescription:
        compressed, window = self.pages.compressed, self.pages.window
        # The tiers keep a block's window part apart from the rest (kv_tiers.py).
        return WorkerDescription(compressed.num_blocks - self.scratch_blocks, self.kv_layout,
                                 compressed.bytes_per_block, str(self.dtype).removeprefix("torch."), str(self.device),
                                 extra_group_blocks=(window.num_blocks - self.scratch_blocks,),
                                 kv_window_nbytes=window.bytes_per_block)

    @property
    def kv_layout(self) -> str:
        """What this rank's blocks hold (both pools' field layouts), so tier keys never mix layouts."""
        return (f"deepseek_v4|dtype={self.dtype}|block={self.block_size}|tp={self.layout.tp.size}|"
                f"{self.layout.describe()}|compressed={self.pages.compressed.layout.describe()}|"
                f"window={self.pages.window.layout.describe()}")

    def execute(self, step_input: StepInput, while_running: Callable[[], None] | None = None) -> StepOutput:
        """Tier transfers first (protocol/kv_transfer_ops.py: all before the forward pass), then
        the step's chunks; `while_running()` at the step's first wait (runner.py)."""
        report = self._transfer_kv(step_input)
        output = self.runner.execute(step_input, while_running)
        return output if report is None else dataclasses.replace(output, kv_report=report)

    def warm_up_stepping_thread(self) -> None:
        """Nothing: V4's kernels keep no per-thread plans (ModelWorker's cuDNN plans are per thread)."""

    def _transfer_kv(self, step_input: StepInput) -> KVTransferReport | None:
        if step_input.kv_transfers is None or self.kv_transfer is None:
            return None  # the same on every rank: they all get this StepInput and one host size
        report = self.kv_transfer.run(step_input.kv_transfers)
        return report if self.layout.world.size == 1 else self.rank_agreement.across(self.layout.world, report)

    def close(self) -> None:
        """Stop the Redis I/O threads and the grammar thread (the pages go with the worker)."""
        if self.kv_transfer is not None:
            self.kv_transfer.close()
        self.grammars.close()


def kernel_choices(config: LongctxConfig) -> KernelChoices:
    """The model's `deepseek_v4_*` kernel choices (kernel_choices.py)."""
    return KernelChoices(config.model.deepseek_v4_chunk_attention, config.model.deepseek_v4_index_top_k)
