"""DeepseekV4ForCausalLM.forward_segments: the chunks of several sequences in one pass equal the same
chunks run one sequence at a time (float32, CPU), hidden states and the states left behind; each
segment's attention reads its own state only."""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.state import SequenceState

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOLERANCE = 1e-5


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


def test_segments_in_one_pass_equal_running_them_one_by_one(model):
    # (tokens already held, chunk length): decodes after prompts of different lengths, a first
    # prefill chunk, a later chunk that crosses compression windows
    plan = [(40, 1, 11), (23, 1, 12), (0, 37, 13), (70, 5, 14), (129, 1, 15)]
    batched_states = [state_after(model, held, seed) for held, _, seed in plan]
    alone_states = [state.snapshot() for state in batched_states]
    chunks = [tokens(length, seed + 100) for _, length, seed in plan]

    hidden = model.forward_segments(list(zip(chunks, batched_states)))
    alone = torch.cat([model(chunk, state) for chunk, state in zip(chunks, alone_states)])

    assert hidden.shape == (sum(len(chunk) for chunk in chunks), model.arch.hidden_size)
    torch.testing.assert_close(hidden, alone, atol=TOLERANCE, rtol=0)
    for batched, by_itself in zip(batched_states, alone_states):
        assert_states_equal(batched, by_itself)


def test_each_segment_attends_to_its_own_state_only(model):
    """The same tokens at the same positions after different prompts: a pass that let one segment's
    attention read the other's state (or the concatenation) would give equal rows."""
    first, second = state_after(model, 33, 21), state_after(model, 33, 22)
    chunk = tokens(3, 23)
    expected = [model(chunk, state.snapshot()) for state in (first, second)]

    hidden = model.forward_segments([(chunk, first), (chunk, second)])

    torch.testing.assert_close(hidden[:3], expected[0], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(hidden[3:], expected[1], atol=TOLERANCE, rtol=0)
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_one_segment_is_the_plain_forward(model):
    state = state_after(model, 17, 31)
    copy = state.snapshot()
    chunk = tokens(4, 32)
    assert torch.equal(model.forward_segments([(chunk, state)]), model(chunk, copy))
    assert_states_equal(state, copy)
