"""DeepseekV4Runner runs the engine's steps: chunked prefills beside decodes, prefix hits, preemption,
and its greedy tokens are the argmax of transformers' full forward over the final sequence."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV4ForCausalLM as ReferenceModel

from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.runner import DeepseekV4Runner
from protocol.sampling_params import SamplingParams
from protocol.step import CachedRequestData, NewRequestData, StepInput

GREEDY = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_deepseek_v4_model(tmp_path_factory.mktemp("v4-runner"), "deepseek-v4-tiny", seed=2)


def prompt(length: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(0, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist())


def new(request_id: str, tokens: tuple[int, ...], computed: int = 0, outputs: tuple[int, ...] = ()) -> NewRequestData:
    return NewRequestData(request_id, tokens, outputs, GREEDY, ((0,), (1,)), computed)


def cached(request_id: str, computed: int) -> CachedRequestData:
    return CachedRequestData(request_id, ((), ()), computed)


def greedy_continuation(folder, tokens: list[int], steps: int) -> list[int]:
    """The argmax of the full forward, one token at a time (the reference's own greedy)."""
    reference = ReferenceModel.from_pretrained(folder).eval()
    tokens = list(tokens)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(reference(torch.tensor([tokens]), use_cache=False).logits[0, -1].argmax()))
    return tokens


def test_chunked_prefill_beside_decode_and_a_prefix_hit(folder):
    """a: 30-token prompt in chunks of 13, 11, 6, then decodes; b arrives later with a prefix hit
    of 12 tokens (state recomputed) and prefills 9 in two chunks beside a's decodes."""
    runner = DeepseekV4Runner(DeepseekV4ForCausalLM.from_folder(folder))
    a, b = prompt(30, seed=1), prompt(21, seed=2)
    outputs = {"a": [], "b": []}
    steps = [StepInput(0, new_requests=(new("a", a),), num_scheduled_tokens={"a": 13}),
             StepInput(1, cached_requests=(cached("a", 13),), num_scheduled_tokens={"a": 11}),
             StepInput(2, cached_requests=(cached("a", 24),), num_scheduled_tokens={"a": 6}),
             StepInput(3, new_requests=(new("b", b, computed=12),), cached_requests=(cached("a", 30),),
                       num_scheduled_tokens={"a": 1, "b": 5}),
             StepInput(4, cached_requests=(cached("a", 31), cached("b", 17)), num_scheduled_tokens={"a": 1, "b": 4})]
    for step_id in range(5, 12):
        steps.append(StepInput(step_id, cached_requests=(cached("a", 27 + step_id), cached("b", 16 + step_id)),
                               num_scheduled_tokens={"a": 1, "b": 1}))
    for step in steps:
        for request_id, token in runner.execute(step).sampled.items():
            outputs[request_id].append(token.token_id)
    assert len(outputs["a"]) == 10 and len(outputs["b"]) == 8
    assert list(a) + outputs["a"] == greedy_continuation(folder, list(a), 10)
    assert list(b) + outputs["b"] == greedy_continuation(folder, list(b), 8)


def test_a_preempted_request_is_rebuilt_from_its_tokens(folder):
    runner = DeepseekV4Runner(DeepseekV4ForCausalLM.from_folder(folder))
    a = prompt(18, seed=3)
    first = runner.execute(StepInput(0, new_requests=(new("a", a),), num_scheduled_tokens={"a": 18})).sampled["a"]
    second = runner.execute(StepInput(1, cached_requests=(cached("a", 18),), num_scheduled_tokens={"a": 1}))
    outputs = (first.token_id, second.sampled["a"].token_id)
    # preempted, then resumed: prompt and outputs travel again, 20 tokens are recomputed
    rebuilt = runner.execute(StepInput(2, new_requests=(new("a", a, outputs=outputs),), num_scheduled_tokens={"a": 20}))
    assert list(a) + [*outputs, rebuilt.sampled["a"].token_id] == greedy_continuation(folder, list(a), 3)
    runner.execute(StepInput(3, finished_request_ids=frozenset({"a"})))
    assert runner.requests == {}


def test_the_scheduler_and_runner_must_agree_on_computed_tokens(folder):
    runner = DeepseekV4Runner(DeepseekV4ForCausalLM.from_folder(folder))
    runner.execute(StepInput(0, new_requests=(new("a", prompt(8, seed=4)),), num_scheduled_tokens={"a": 4}))
    with pytest.raises(RuntimeError, match="runner computed 4 tokens, scheduler says 5"):
        runner.execute(StepInput(1, cached_requests=(cached("a", 5),), num_scheduled_tokens={"a": 3}))
