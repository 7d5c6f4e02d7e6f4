"""Where a DeepSeek-V4 forward spends GPU time: CUDA-event timers around its components.

`SectionTimer` wraps the component methods and functions listed in SECTIONS while it is entered
(and restores them on exit), records a CUDA event pair around each call, and after a
synchronize reports exclusive milliseconds per section: a section's time minus the time of the
sections called inside it (e.g. "attention: projections" is the attention layer without its
compressors, indexer and core). Events do not synchronize: the forward runs as it would
unwrapped, plus two event records per call. Names missing from a code version are skipped, so
the same timer profiles an older checkout.
"""

from __future__ import annotations

import functools
import importlib
from collections import Counter

import torch

# (section name, module, attribute path); methods are patched on their class
SECTIONS = [
    ("mhc", "model_shards.deepseek_v4.hyper_connections", "HyperConnection.forward"),
    ("mhc", "model_shards.deepseek_v4.hyper_connections", "HyperHead.forward"),
    ("mhc", "model_shards.deepseek_v4.model", "mix_streams"),
    ("attention: projections, norms, rope", "model_shards.deepseek_v4.attention", "DeepseekV4Attention.forward"),
    ("attention: projections, norms, rope", "model_shards.deepseek_v4.attention",
     "DeepseekV4Attention.forward_segments"),
    ("compressor", "model_shards.deepseek_v4.compressor", "Compressor.append"),
    ("compressor", "model_shards.deepseek_v4.compressor", "Compressor.project"),
    ("indexer: projections", "model_shards.deepseek_v4.indexer", "LightningIndexer.select"),
    ("indexer: projections", "model_shards.deepseek_v4.indexer", "LightningIndexer.project"),
    ("indexer: scores", "model_shards.deepseek_v4.indexer", "index_scores"),
    ("indexer: top-k", "model_shards.deepseek_v4.indexer", "top_k_earliest_first"),
    ("indexer: top-k", "model_shards.deepseek_v4.indexer", "top_k_of_ranking"),
    ("indexer: top-k", "model_shards.deepseek_v4.indexer", "top_k_by_threshold"),  # the default since session 12
    ("attention core: softmax, sink, PV", "model_shards.deepseek_v4.attention", "sink_attention"),  # before chunk_cores
    ("attention core: softmax, sink, PV", "model_shards.deepseek_v4.attention", "attend_chunk"),
    ("attention core: softmax, sink, PV", "model_shards.deepseek_v4.attention", "decode_attention"),
    ("attention core: decode key gather", "model_shards.deepseek_v4.decode_attention", "_query_keys"),
    ("attention core: window views", "model_shards.deepseek_v4.sink_attention", "_query_windows"),
    ("attention core: compressed gather", "model_shards.deepseek_v4.sink_attention", "_compressed_group"),
    ("moe: router", "model_shards.deepseek_v4.moe", "Router.forward"),
    ("moe: routed experts", "model_shards.deepseek_v4.moe", "LocalExperts.forward"),
    ("moe: shared expert", "model_shards.deepseek_v4.moe", "SharedExpertSlice.forward"),
    ("embedding, logits", "model_shards.parallel.tensor_parallel", "VocabParallelEmbedding.forward"),
    ("embedding, logits", "model_shards.parallel.tensor_parallel", "VocabParallelEmbedding.logits"),
]


class SectionTimer:
    def __init__(self, sections: list[tuple[str, str, str]] | None = None):
        self.sections = SECTIONS if sections is None else sections
        self.calls: list[list] = []  # [name, start event, end event, parent index]
        self.stack: list[int] = []
        self.restore: list[tuple[object, str, object]] = []

    def __enter__(self) -> SectionTimer:
        for name, module_name, path in self.sections:
            owner = importlib.import_module(module_name)
            *classes, attribute = path.split(".")
            for class_name in classes:
                owner = getattr(owner, class_name, None)
            if owner is None or not hasattr(owner, attribute):
                continue
            original = owner.__dict__[attribute] if attribute in owner.__dict__ else getattr(owner, attribute)
            self.restore.append((owner, attribute, original))
            setattr(owner, attribute, self._timed(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attribute, original in reversed(self.restore):
            setattr(owner, attribute, original)
        self.restore.clear()

    def _timed(self, name: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.calls.append([name, start, end, self.stack[-1] if self.stack else None])
            self.stack.append(len(self.calls) - 1)
            start.record()
            try:
                return function(*args, **kwargs)
            finally:
                end.record()
                self.stack.pop()
        return timed

    def exclusive_ms(self) -> dict[str, float]:
        """Milliseconds per section, nested sections' time taken out of their parents'."""
        torch.cuda.synchronize()
        inclusive = [start.elapsed_time(end) for _, start, end, _ in self.calls]
        totals: Counter[str] = Counter()
        for (name, _, _, parent), elapsed in zip(self.calls, inclusive):
            totals[name] += elapsed
            if parent is not None:
                totals[self.calls[parent][0]] -= elapsed
        return dict(sorted(totals.items(), key=lambda item: -item[1]))
