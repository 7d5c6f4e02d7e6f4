"""A dense step's inputs go up to the GPU without the host waiting for it: a plain `.to(device)`
of pageable memory synchronizes the stream, so the GPU idled between a long prompt's chunks
while the host built the next step (model_shards/step_batch.py, attention/base.py)."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch

from model_shards.step_batch import RequestState, build_batch
from protocol.step import StepInput

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BLOCK = 64


def request(prompt_tokens: int, computed: int) -> RequestState:
    sampling = SimpleNamespace(params=SimpleNamespace(prompt_logprobs=None))
    blocks = array("q", range(7, 7 + -(-prompt_tokens // BLOCK)))  # as the worker keeps them
    return RequestState(list(range(prompt_tokens)), blocks, computed, sampling, prompt_tokens)


def test_a_step_batch_is_built_without_a_host_wait():
    requests = {"long": request(20_000, 4096), "short": request(300, 0)}
    step = StepInput(0, num_scheduled_tokens={"long": 2048, "short": 300})
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # keep the stream busy: a waiting copy would wait for this
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = build_batch(requests, step, BLOCK, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert batch.input_ids.tolist() == list(range(4096, 6144)) + list(range(300))
    assert batch.positions.tolist() == list(range(4096, 6144)) + list(range(300))
    first_slot = 7 * BLOCK + 4096  # block 7 + 64 of the long request, offset 0
    assert batch.metadata.slot_mapping[:2].tolist() == [first_slot, first_slot + 1]
    assert batch.metadata.block_table_tensor.shape == (2, 320) and batch.sample_request_ids == ["short"]


def test_packed_uploads_keep_their_values_while_the_stream_is_busy():
    """The staging buffers come from the caching host allocator: one must not be handed to the next
    upload before the copy that reads it has run (here all 64 copies are queued behind 50 ms)."""
    from model_shards.device import upload_packed

    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)
    uploads = [upload_packed([torch.full((1000,), step), torch.arange(step, step + 6).view(2, 3)], torch.device("cuda"))
               for step in range(64)]
    for step, (filled, grid) in enumerate(uploads):
        assert filled.tolist() == [step] * 1000
        assert grid.shape == (2, 3) and grid.flatten().tolist() == list(range(step, step + 6))
