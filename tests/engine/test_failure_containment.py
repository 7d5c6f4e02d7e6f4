"""One request's failure stays that request's: an exception while sampling, building its sampler
state or processing its output ends that request with an error to its caller, and the engine and
every other request go on exactly as if it had never been there (issue 17, finding 1)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from engine.async_engine import AsyncEngine
from engine.offline import generate
from engine.outputs import RequestFailedError
from protocol.sampling_params import SamplingParams
from protocol.step import NewRequestData, StepInput

POISON_SEED = 666  # marks the request whose sampling fails; greedy rows never read their seed
FAIL_AT_OUTPUT = 2  # its third token is the one that fails


class SamplerFailingOneRequest:
    """The worker's real sampler, raising whenever the marked request is in the batch at its
    FAIL_AT_OUTPUT-th output: the other rows of that batch must still get their tokens."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __call__(self, logits, states):
        for state in states:
            if state.params.seed == POISON_SEED and state.num_output_tokens == FAIL_AT_OUTPUT:
                raise RuntimeError("injected sampling failure")
        return self.sampler(logits, states)


def _greedy(max_tokens: int, seed: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=seed)


PROMPTS = {"first": "The contract says", "poisoned": "Once upon a time", "third": "Hello there, world"}


def test_a_failure_in_one_request_s_sampling_ends_it_alone(tiny_model_dir, make_engine_for):
    reference_engine = make_engine_for(tiny_model_dir)
    reference = {rid: generate(reference_engine, [prompt], _greedy(12))[0][0].token_ids
                 for rid, prompt in PROMPTS.items() if rid != "poisoned"}
    engine = AsyncEngine(make_engine_for(tiny_model_dir))
    worker = engine.engine.executor.worker
    worker.sampler = SamplerFailingOneRequest(worker.sampler)

    async def run(request_id: str) -> list[int] | BaseException:
        params = _greedy(12, POISON_SEED if request_id == "poisoned" else None)
        tokens = []
        try:
            async for delta in engine.generate(request_id, PROMPTS[request_id], params):
                tokens.extend(delta.token_ids)
        except RequestFailedError as error:
            return error
        return tokens

    async def scenario():
        return dict(zip(PROMPTS, await asyncio.gather(*(run(rid) for rid in PROMPTS))))

    try:
        outcomes = asyncio.run(scenario())
        assert isinstance(outcomes["poisoned"], RequestFailedError)
        assert "injected sampling failure" in str(outcomes["poisoned"])
        assert outcomes["first"] == reference["first"] and outcomes["third"] == reference["third"]
        assert engine.is_alive
        manager = engine.engine.kv_cache
        assert manager.num_free_blocks == manager.num_blocks and not engine.engine.has_unfinished_requests()
        again = asyncio.run(scenario())  # the engine still serves, the poisoned request fails alike
        assert again["first"] == reference["first"] and isinstance(again["poisoned"], RequestFailedError)
    finally:
        engine.shutdown()


def test_a_failure_processing_one_request_s_output_ends_it_alone(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir)
    reference = generate(engine, [PROMPTS["first"]], _greedy(8))[0][0].token_ids
    engine.add_request("broken", PROMPTS["poisoned"], _greedy(8))
    engine.add_request("fine", PROMPTS["first"], _greedy(8))

    def broken_detokenizer(token_id, finish_status):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    engine._sequences["broken"].output.text = broken_detokenizer
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    broken = [d for d in deltas if d.request_id == "broken"]
    assert len(broken) == 1 and broken[0].finish_reason == "error" and "injected" in broken[0].error
    assert [t for d in deltas if d.request_id == "fine" for t in d.token_ids] == reference
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def _past_every_check(**fields) -> SamplingParams:
    """Params that the checks at the ingress and in the engine would refuse, as if one slipped by."""
    params = SamplingParams(max_tokens=4, seed=1)
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


@pytest.fixture(scope="module")
def own_engine(tiny_model_dir, make_engine_for):
    """An engine whose worker the test drives by hand (writing KV into blocks the scheduler of a
    shared engine may have cached)."""
    engine = make_engine_for(tiny_model_dir)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("bad", [
    {"temperature": 1.0, "seed": 2**64},  # the three requests that took the whole engine down
    {"min_tokens": 2, "stop_token_ids": (10**9,)},
    {"temperature": 1.0, "top_p": 0.5, "top_k": 10**20},
], ids=["seed", "stop_token_ids", "top_k"])
def test_the_worker_reports_a_request_it_cannot_sample_and_serves_the_rest(own_engine, bad):
    worker = own_engine.executor.worker
    prompt = tuple(own_engine.tokenizer.encode("Hello there"))
    num_blocks = -(-len(prompt) // own_engine.block_size)

    def new(request_id: str, params: SamplingParams, place: int) -> NewRequestData:
        blocks = (tuple(range(place * num_blocks, (place + 1) * num_blocks)),)  # one KV block group
        return NewRequestData(request_id, prompt, (), params, blocks, 0)

    good = dataclasses.replace(_greedy(4), eos_token_ids=())
    step = StepInput(1, (new("good", good, 0), new("bad", _past_every_check(**bad), 1)), (),
                     {"good": len(prompt), "bad": len(prompt)})
    alone = StepInput(2, (new("alone", good, 2),), (), {"alone": len(prompt)})
    try:
        output = worker.execute(step)
        assert set(output.failed) == {"bad"} and set(output.sampled) == {"good"}
        assert output.sampled["good"] == worker.execute(alone).sampled["alone"]
        assert "bad" not in worker.requests and "good" in worker.requests
    finally:
        worker.execute(StepInput(3, finished_request_ids=frozenset({"good", "bad", "alone"})))
