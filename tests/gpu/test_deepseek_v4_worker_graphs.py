"""The DeepSeek-V4 worker on a GPU captures its decode graphs at start and replays them: greedy
tokens equal the same engine's with graphs off. The worker's pools differ in size (the window pool
is the smaller), which the unit tests of decode_graphs.py build by hand; session 11's first capture
asserted on the device there (the scratch ids were swapped) and every later step failed. A top-32
indexer, wider than the entries of these prompts, takes the flash shape's k < top-k branch.
Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from protocol.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def greedy_tokens(folder, graph_max_batch: int) -> tuple[list[list[int]], object]:
    engine = LLMEngine(LongctxConfig(
        model=ModelSettings(path=str(folder), device="cuda", dtype="bfloat16", max_model_len=4096,
                            cuda_graph_max_batch=graph_max_batch),
        cache=CacheSettings(num_device_blocks=96), scheduler=SchedulerSettings(max_num_seqs=8)))
    try:
        prompts = [[(7 * i + j) % 900 + 3 for j in range(30 + 11 * i)] for i in range(5)]
        results = generate(engine, prompts, GREEDY)
        return [sequences[0].token_ids for sequences in results], engine.executor.worker.runner.decode_graphs
    finally:
        engine.shutdown()


def test_the_workers_decode_graphs_replay_and_equal_eager_steps(tmp_path):
    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=2, index_topk=32)
    eager, no_graphs = greedy_tokens(folder, 0)
    graphed, graphs = greedy_tokens(folder, 8)
    assert no_graphs is None and graphs is not None
    assert graphs.capture_error is None, graphs.capture_error
    assert graphs.graphs, "no decode graph was captured"
    assert graphed == eager
