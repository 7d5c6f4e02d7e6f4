"""DeepseekV4ForCausalLM.forward_segments: the chunks of several sequences in one pass (projections
once over all tokens, every single-token segment in one batched attention core) equal the same
chunks run one sequence at a time with the chunk attention core (float32, CPU), hidden states and
the states left behind; each segment's attention reads its own state only."""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4 import attention as attention_module
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.sink_attention import sink_attention
from model_shards.deepseek_v4.state import SequenceState

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOLERANCE = 1e-5
# Hidden states reach |12|, where float32 rounding alone (another matmul shape for the token-wise
# parts, another key order in the softmax) moves them by ~1e-5: compare them relative to their size.
RELATIVE = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_deepseek_v4_model(tmp_path_factory.mktemp("v4-segments"), "deepseek-v4-tiny", seed=3)
    return DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)


def tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (length,), generator=torch.Generator().manual_seed(seed))


def state_after(model, length: int, seed: int) -> SequenceState:
    """A sequence's state after a prompt of `length` tokens (empty for 0)."""
    state = model.new_state()
    if length:
        model(tokens(length, seed), state)
    return state


def state_tensors(state: SequenceState) -> list[torch.Tensor]:
    """Every tensor a state holds: window keys, compressor and indexer entries and open windows."""
    found = []
    for layer in state.layers:
        found.append(layer.window.keys)
        for compressor in (layer.compressor, layer.indexer):
            if compressor is not None:
                found += [compressor.entries.rows, compressor.pending_kv, compressor.pending_gate]
                found += [t for t in (compressor.overlap_kv, compressor.overlap_gate) if t is not None]
    return found


def assert_states_equal(batched: SequenceState, alone: SequenceState) -> None:
    assert batched.num_tokens == alone.num_tokens
    pairs = list(zip(state_tensors(batched), state_tensors(alone), strict=True))
    for got, want in pairs:
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


def each_query_alone(q, keys, sliding_window, sinks, scale):
    """decode_attention's reference: sink_attention (the chunk path) for each query by itself."""
    return torch.cat([sink_attention(q[i:i + 1], window_keys, sliding_window, compressed, sinks, scale)
                      for i, (window_keys, compressed) in enumerate(keys)])


def one_by_one(model, chunks: list[torch.Tensor], states: list[SequenceState]) -> torch.Tensor:
    """Each chunk in its own forward, and a single token's attention core as any chunk's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_module, "decode_attention", each_query_alone)
        return torch.cat([model(chunk, state) for chunk, state in zip(chunks, states)])


def run_plan_both_ways(model, plan: list[tuple[int, int, int]]) -> None:
    """plan: (tokens already held, chunk length, seed) per segment. One forward_segments pass equals
    the same chunks run one by one: hidden states within 1e-5, and the states left behind."""
    batched_states = [state_after(model, held, seed) for held, _, seed in plan]
    alone_states = [state.snapshot() for state in batched_states]
    chunks = [tokens(length, seed + 100) for _, length, seed in plan]

    hidden = model.forward_segments(list(zip(chunks, batched_states)))
    alone = one_by_one(model, chunks, alone_states)

    assert hidden.shape == (sum(len(chunk) for chunk in chunks), model.arch.hidden_size)
    torch.testing.assert_close(hidden, alone, atol=TOLERANCE, rtol=RELATIVE)
    for batched, by_itself in zip(batched_states, alone_states):
        assert_states_equal(batched, by_itself)


def test_segments_in_one_pass_equal_running_them_one_by_one(model):
    # decodes after prompts of different lengths (the tiny preset: window 8, CSA every 4 tokens with
    # top-4, HCA every 16): the very first token, one that closes the first CSA entry (fewer entries
    # than top-k), one that closes a CSA window, one that closes a CSA and an HCA window, longer
    # ones; a first prefill chunk; a later chunk that crosses compression windows
    plan = [(40, 1, 11), (23, 1, 12), (0, 37, 13), (70, 5, 14), (129, 1, 15), (0, 1, 16), (3, 1, 17),
            (47, 1, 18), (6, 1, 19)]
    run_plan_both_ways(model, plan)


def test_decodes_only_run_as_one_batch_and_equal_one_by_one(model):
    """Every segment a single token: the batched attention core alone, contexts 1 .. 200 tokens."""
    run_plan_both_ways(model, [(held, 1, 40 + held) for held in (0, 3, 15, 31, 47, 64, 129, 200)])


def test_decode_steps_in_a_row_keep_equal_states(model):
    """Three decode steps of four sequences, batched against one by one, from the states each leaves."""
    held = [(9, 51), (15, 52), (63, 53), (30, 54)]
    batched = [state_after(model, length, seed) for length, seed in held]
    alone = [state.snapshot() for state in batched]
    for step in range(3):
        chunks = [tokens(1, seed + 10 * step) for _, seed in held]
        hidden = model.forward_segments(list(zip(chunks, batched)))
        expected = one_by_one(model, chunks, alone)
        torch.testing.assert_close(hidden, expected, atol=TOLERANCE, rtol=RELATIVE)
    for got, want in zip(batched, alone):
        assert_states_equal(got, want)


def test_each_segment_attends_to_its_own_state_only(model):
    """The same tokens at the same positions after different prompts: a pass that let one segment's
    attention read the other's state (or the concatenation) would give equal rows."""
    first, second = state_after(model, 33, 21), state_after(model, 33, 22)
    chunk = tokens(3, 23)
    expected = [model(chunk, state.snapshot()) for state in (first, second)]

    hidden = model.forward_segments([(chunk, first), (chunk, second)])

    torch.testing.assert_close(hidden[:3], expected[0], atol=TOLERANCE, rtol=RELATIVE)
    torch.testing.assert_close(hidden[3:], expected[1], atol=TOLERANCE, rtol=RELATIVE)
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_one_segment_is_the_plain_forward(model):
    state = state_after(model, 17, 31)
    copy = state.snapshot()
    chunk = tokens(4, 32)
    assert torch.equal(model.forward_segments([(chunk, state)]), model(chunk, copy))
    assert_states_equal(state, copy)
