"""A step that mixes decodes with prompt chunks: the decodes replay their CUDA graph and only the
prompt chunks run eagerly (model_shards/worker.py `_run_model`). On the CPU a stand-in takes the
graphs' place and runs the rows it is given in a forward pass of their own, as a replay does; the
joined step must give every request the tokens, logprobs and prompt logprobs of a step run whole."""

from __future__ import annotations

import pytest
import torch

from cluster.config import CacheSettings, LongctxConfig, ModelSettings
from engine.llm_engine import LLMEngine
from model_shards.attention.base import AttentionMetadata
from model_shards.cuda_graphs import DecodeRow
from protocol.sampling_params import SamplingParams

from .test_engine_vs_hf import random_prompt

LOGPROB_TOLERANCE = 1e-4  # float32: a row's matmuls in a batch of other rows may round differently


class EagerDecodeReplays:
    """Stands in for DecodeGraphs: each `run` is one forward pass of the given decode rows alone."""

    def __init__(self, worker):
        self.worker = worker
        self.runs: list[list[str]] = []

    def run(self, rows: list[DecodeRow]) -> torch.Tensor:
        self.runs.append([row.request_id for row in rows])
        metadata, input_ids = AttentionMetadata.build_with_inputs(
            [(row.block_table, row.position, 1) for row in rows], self.worker.block_size, self.worker.device,
            [row.token_id for row in rows])
        return self.worker.model(input_ids, metadata.positions, metadata, self.worker.kv_cache)

    def release(self, request_id: str) -> None:
        pass


def _engine(model_dir: str, max_prompt_tokens: int, device: str = "cpu") -> LLMEngine:
    on_gpu = device == "cuda"
    return LLMEngine(LongctxConfig(
        model=ModelSettings(path=model_dir, dtype="bfloat16" if on_gpu else "float32", device=device,
                            attention_backend="cudnn_triton" if on_gpu else "auto", cuda_graph_max_batch=8,
                            mixed_step_graph_max_prompt_tokens=max_prompt_tokens),
        cache=CacheSettings(block_size=16 if on_gpu else 4, num_device_blocks=256),
    ))


def _run(engine: LLMEngine, replays: EagerDecodeReplays | None) -> dict[str, tuple]:
    """Two requests decode; two prompts (one scoring its prompt) join them at the fourth step."""
    if replays is not None:
        engine.executor.worker.decode_graphs = replays
    decoding = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2)
    joining = [SamplingParams(max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=2),
               SamplingParams(max_tokens=4, ignore_eos=True, logprobs=2)]
    for index in range(2):
        engine.add_request(f"early-{index}", random_prompt(20 + index, 30 + 7 * index), decoding)
    deltas = []
    for step in range(64):
        if step == 3:
            for index, params in enumerate(joining):
                engine.add_request(f"joining-{index}", random_prompt(40 + index, 25 + 9 * index), params)
        deltas += engine.step()
        if step > 3 and not engine.has_unfinished_requests():
            break
    results: dict[str, tuple] = {}
    for delta in deltas:
        sampled, prompt_logprobs = results.get(delta.request_id, ([], None))
        sampled += delta.logprobs  # one SampledToken a token
        if delta.prompt_logprobs is not None:
            prompt_logprobs = [(token.token_id, token.logprob) for token in delta.prompt_logprobs]
        results[delta.request_id] = (sampled, prompt_logprobs)
    return results


def _assert_same(ours: dict[str, tuple], whole: dict[str, tuple]) -> None:
    assert sorted(ours) == sorted(whole) == ["early-0", "early-1", "joining-0", "joining-1"]
    for request_id, (sampled, prompt_logprobs) in whole.items():
        our_sampled, our_prompt_logprobs = ours[request_id]
        assert [token.token_id for token in our_sampled] == [token.token_id for token in sampled], request_id
        assert [token.logprob for token in our_sampled] == pytest.approx(
            [token.logprob for token in sampled], abs=LOGPROB_TOLERANCE), request_id
        if prompt_logprobs is None:
            assert our_prompt_logprobs is None
            continue
        assert [token for token, _ in our_prompt_logprobs] == [token for token, _ in prompt_logprobs]
        assert [value for _, value in our_prompt_logprobs] == pytest.approx(
            [value for _, value in prompt_logprobs], abs=LOGPROB_TOLERANCE)


def test_a_mixed_step_replays_its_decodes_and_runs_its_prompts_eagerly(tiny_model_dir):
    whole = _run(_engine(tiny_model_dir, 2048), None)  # no graphs: every step eager, whole
    split_engine = _engine(tiny_model_dir, 2048)
    split = EagerDecodeReplays(split_engine.executor.worker)
    _assert_same(_run(split_engine, split), whole)
    unsplit_engine = _engine(tiny_model_dir, 0)
    unsplit = EagerDecodeReplays(unsplit_engine.executor.worker)
    _assert_same(_run(unsplit_engine, unsplit), whole)
    # The step the prompts joined (steps: prefill, decode, decode, mixed, ...): with the limit at 0
    # it ran wholly eager, otherwise its two decodes were replayed and only the prompts ran eagerly.
    assert split.runs[:3] == [["early-0", "early-1"]] * 3
    assert unsplit.runs[:2] == [["early-0", "early-1"]] * 2
    assert unsplit.runs[2] == ["early-0", "early-1", "joining-0", "joining-1"]
    assert len(split.runs) == len(unsplit.runs) + 1


def test_prompt_chunks_past_the_limit_run_the_whole_step_eagerly(tiny_model_dir):
    engine = _engine(tiny_model_dir, 24)  # the joining prompts bring 25 + 34 tokens
    replays = EagerDecodeReplays(engine.executor.worker)
    _run(engine, replays)
    assert replays.runs[2] == ["early-0", "early-1", "joining-0", "joining-1"]


# bf16 on the GPU: the decodes' rows run in a batch of their own (a graph, padded to its size)
# rather than beside the prompts' rows, so cuBLAS may round their activations differently: a
# logprob may move by about one bf16 ulp of a logit, and a greedy token may flip where the top
# two were that close (tests/model_shards/test_cuda_graphs.py says the same of padded graphs).
BF16_LOGPROB_TOLERANCE = 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_a_mixed_step_replays_the_decode_graph(tmp_path):
    pytest.importorskip("triton")
    from model_shards.make_model import make_model

    folder = str(make_model(tmp_path / "model", "tiny", seed=0, num_key_value_heads=2, head_dim=64, hidden_size=512))
    results = {}
    for limit in (2048, 0):
        engine = _engine(folder, limit, "cuda")
        graphs = engine.executor.worker.decode_graphs
        replayed, run = [], graphs.run
        graphs.run = lambda rows, run=run, replayed=replayed: replayed.append(len(rows)) or run(rows)
        try:
            results[limit] = _run(engine, None)
        finally:
            engine.shutdown()
        assert replayed[:3] == ([2, 2, 2] if limit else [2, 2, 4])
    for request_id, (sampled, _) in results[0].items():
        for ours, theirs in zip(results[2048][request_id][0], sampled):
            assert abs(ours.logprob - theirs.logprob) <= BF16_LOGPROB_TOLERANCE, request_id
            if ours.token_id != theirs.token_id:
                (_, first), (_, second) = theirs.top_logprobs[:2]
                assert first - second <= 2 * BF16_LOGPROB_TOLERANCE, request_id
                break
