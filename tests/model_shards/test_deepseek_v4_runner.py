"""DeepseekV4Runner runs the engine's steps on the paged hybrid cache: chunked prefills beside decodes,
a prefix hit read from another request's pages, preemption; its greedy tokens are the argmax of
transformers' full forward over the final sequence. Block ids are given by hand here (the
coordinator's are tested in tests/kvcache/test_block_groups.py and through the engine)."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV4ForCausalLM as ReferenceModel

from model_folder.deepseek_v4_config import DeepseekV4Architecture
from model_shards.deepseek_v4.kv_pages import PagePool, compressed_layout, window_layout
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.paged_state import PagedKV
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


BLOCK = 16  # the tiny preset's derived block size
NULL = -1  # a window block freed (left the window)
TABLES = ((0, 1, 2, 3), (0, 1, 2, 3))  # (compressed, window): 64 tokens


def make_runner(folder, num_blocks: int = 16) -> DeepseekV4Runner:
    model = DeepseekV4ForCausalLM.from_folder(folder)
    arch: DeepseekV4Architecture = model.arch
    pages = PagedKV(PagePool(compressed_layout(arch, BLOCK, model.dtype), num_blocks, "cpu"),
                    PagePool(window_layout(arch, BLOCK, model.dtype), num_blocks, "cpu"), BLOCK)
    return DeepseekV4Runner(model, pages)


def new(request_id: str, tokens: tuple[int, ...], computed: int = 0, outputs: tuple[int, ...] = (),
        tables=TABLES) -> NewRequestData:
    return NewRequestData(request_id, tokens, outputs, GREEDY, tables, computed)


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


def test_chunked_prefill_beside_decode_and_a_prefix_hit_read_from_pages(folder):
    """a: 40-token prompt in chunks of 13, 11, 16, then decodes. b shares a's first 32 tokens: it
    arrives with 32 computed, a's first two compressed blocks and a's window block 1 (the 7
    tokens before 32) at the head of its tables, and prefills 9 more in two chunks beside a's decodes."""
    runner = make_runner(folder)
    a = prompt(40, seed=1)
    b = a[:32] + prompt(9, seed=2)
    b_tables = ((0, 1, 5, 6), (NULL, 1, 7, 8))
    outputs = {"a": [], "b": []}
    steps = [StepInput(0, new_requests=(new("a", a),), num_scheduled_tokens={"a": 13}),
             StepInput(1, cached_requests=(cached("a", 13),), num_scheduled_tokens={"a": 11}),
             StepInput(2, cached_requests=(cached("a", 24),), num_scheduled_tokens={"a": 16}),
             StepInput(3, new_requests=(new("b", b, computed=32, tables=b_tables),), cached_requests=(cached("a", 40),),
                       num_scheduled_tokens={"a": 1, "b": 5}),
             StepInput(4, cached_requests=(cached("a", 41), cached("b", 37)), num_scheduled_tokens={"a": 1, "b": 4})]
    for step_id in range(5, 12):
        steps.append(StepInput(step_id, cached_requests=(cached("a", 37 + step_id), cached("b", 36 + step_id)),
                               num_scheduled_tokens={"a": 1, "b": 1}))
    for step in steps:
        for request_id, token in runner.execute(step).sampled.items():
            outputs[request_id].append(token.token_id)
    assert len(outputs["a"]) == 10 and len(outputs["b"]) == 8
    assert list(a) + outputs["a"] == greedy_continuation(folder, list(a), 10)
    assert list(b) + outputs["b"] == greedy_continuation(folder, list(b), 8)


def test_a_preempted_request_is_rebuilt_from_its_tokens(folder):
    runner = make_runner(folder)
    a = prompt(18, seed=3)
    first = runner.execute(StepInput(0, new_requests=(new("a", a),), num_scheduled_tokens={"a": 18})).sampled["a"]
    second = runner.execute(StepInput(1, cached_requests=(cached("a", 18),), num_scheduled_tokens={"a": 1}))
    outputs = (first.token_id, second.sampled["a"].token_id)
    # preempted, then resumed in other blocks: prompt and outputs travel again, 20 tokens are recomputed
    rebuilt = runner.execute(StepInput(2, new_requests=(new("a", a, outputs=outputs, tables=((6, 7), (8, 9))),),
                                       num_scheduled_tokens={"a": 20}))
    assert list(a) + [*outputs, rebuilt.sampled["a"].token_id] == greedy_continuation(folder, list(a), 3)
    runner.execute(StepInput(3, finished_request_ids=frozenset({"a"})))
    assert runner.requests == {}


def test_the_scheduler_and_runner_must_agree_on_computed_tokens(folder):
    runner = make_runner(folder)
    runner.execute(StepInput(0, new_requests=(new("a", prompt(8, seed=4)),), num_scheduled_tokens={"a": 4}))
    with pytest.raises(RuntimeError, match="runner computed 4 tokens, scheduler says 5"):
        runner.execute(StepInput(1, cached_requests=(cached("a", 5),), num_scheduled_tokens={"a": 3}))


def test_a_hit_must_end_on_a_block_boundary(folder):
    """Pages hold whole compression windows only: a resume inside a block has no open windows."""
    runner = make_runner(folder)
    output = runner.execute(StepInput(0, new_requests=(new("a", prompt(20, seed=5), computed=12),),
                                      num_scheduled_tokens={"a": 8}))
    assert "starting at token 12, inside a block" in output.failed["a"] and not output.sampled  # that request alone


@pytest.mark.parametrize("chunks", [(37, 27, 1, 1, 30), (16, 48, 3, 29)])
def test_pages_in_shuffled_blocks_give_the_in_memory_models_hidden_states_exactly(folder, chunks):
    """The same chunks on one in-memory SequenceState and on pages whose block tables are a random
    permutation (entries read by address, keys scored through the table): equal bit for bit."""
    runner = make_runner(folder, num_blocks=24)
    model, pages = runner.model, runner.pages
    ids = torch.tensor(prompt(sum(chunks), seed=11))
    blocks = -(-len(ids) // BLOCK)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(len(chunks))).tolist()
    tables = (order[:blocks], order[blocks:2 * blocks])  # the two pools' ids need not agree
    state, slot, start = model.new_state(), pages.open_windows.take(model.new_state), 0
    for count in chunks:
        expected = model(ids[start:start + count], state)
        paged = pages.load(model.new_state, tables, start, slot)
        assert torch.equal(model(ids[start:start + count], paged), expected)
        pages.save(paged, slot)
        start += count


def test_decode_keeps_block_tables_on_the_device_and_copies_only_new_ids(folder):
    """A 15-token prompt in one block of each group, then 20 decodes that open blocks 1 and 2 as the
    scheduler hands them over: the runner's device tables are the same tensors across steps, hold
    the host tables exactly, and the tokens are the reference's greedy ones."""
    runner = make_runner(folder)
    a = prompt(15, seed=6)
    sampled = [runner.execute(StepInput(0, new_requests=(new("a", a, tables=((3,), (5,))),),
                                        num_scheduled_tokens={"a": 15})).sampled["a"].token_id]
    mirrors = runner.requests["a"].device_tables
    storage = [mirror.table.data_ptr() for mirror in mirrors]
    for step_id in range(1, 21):
        computed = 14 + step_id
        new_ids = {BLOCK: ((7,), (2,)), 2 * BLOCK: ((9,), (11,))}.get(computed, ((), ()))
        step = StepInput(step_id, cached_requests=(CachedRequestData("a", new_ids, computed),),
                         num_scheduled_tokens={"a": 1})
        sampled.append(runner.execute(step).sampled["a"].token_id)
    request = runner.requests["a"]
    assert request.block_ids == [[3, 7, 9], [5, 2, 11]]
    assert [mirror.table.data_ptr() for mirror in request.device_tables] == storage  # never rebuilt
    assert [mirror.update(ids).tolist() for mirror, ids in zip(request.device_tables, request.block_ids)] == \
        request.block_ids
    assert list(a) + sampled == greedy_continuation(folder, list(a), 21)
