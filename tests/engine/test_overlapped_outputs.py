"""scheduler.overlap_outputs: a serving loop's engine (`step(deliver)`) makes a step's text
(detokenizing, stop strings, deltas) and delivers it while the next step runs, inside the worker's
step right before it waits for its tokens. What the callers get is what the step-by-step engine
gives; a stop string found a step late costs one token of compute, which is dropped."""

from __future__ import annotations

import time

import pytest

from engine.outputs import CompletionDelta
from protocol.sampling_params import SamplingParams

PROMPTS = ["The overlapped engine", "makes text while", "the next step runs on the device"]


def _run(engine, requests: dict[str, tuple[str, SamplingParams]], overlap: bool) -> dict[str, list[CompletionDelta]]:
    """Every request's deltas, the engine stepped to the end: by `step(deliver)` (overlapped) or
    by `step()` (each step's deltas returned by that step)."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    deltas: list[CompletionDelta] = []
    while engine.has_unfinished_requests():
        if overlap:
            assert engine.step(deltas.extend) == []
        else:
            deltas += engine.step()
    return {rid: [d for d in deltas if d.request_id == rid] for rid in requests}


def _comparable(deltas: list[CompletionDelta]) -> list[tuple]:
    return [(d.index, d.text, d.token_ids, d.finish_reason, d.num_output_tokens, d.num_kv_blocks,
             tuple(round(t.logprob, 5) for t in d.logprobs if t.logprob is not None)) for d in deltas]


def _requests(reference_text: str, reference_ids: tuple[int, ...]) -> dict[str, tuple[str, SamplingParams]]:
    """Greedy requests that end every way: a stop string and a stop token taken from the free
    run's output, the length, logprobs, and n = 2 seeded sampling."""
    stop_string = reference_text[len(reference_text) // 2 : len(reference_text) // 2 + 3]
    return {
        "stop-string": (PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0, stop=(stop_string,),
                                                   ignore_eos=True)),
        "stop-token": (PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0,
                                                  stop_token_ids=(reference_ids[5],), ignore_eos=True)),
        "length": (PROMPTS[1], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, logprobs=2)),
        "sampled": (PROMPTS[2], SamplingParams(max_tokens=9, temperature=1.0, seed=7, n=2, ignore_eos=True)),
    }


@pytest.fixture(scope="module")
def free_run(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir)
    (deltas,) = _run(engine, {"free": (PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0,
                                                                  ignore_eos=True))}, overlap=False).values()
    return "".join(d.text for d in deltas), tuple(t for d in deltas for t in d.token_ids)


def test_overlapped_deltas_are_the_step_by_step_ones(tiny_model_dir, make_engine_for, free_run):
    requests = _requests(*free_run)
    step_by_step = _run(make_engine_for(tiny_model_dir), requests, overlap=False)
    engine = make_engine_for(tiny_model_dir)
    overlapped = _run(engine, requests, overlap=True)
    for request_id in requests:
        assert _comparable(overlapped[request_id]) == _comparable(step_by_step[request_id]), request_id
    assert step_by_step["stop-string"][-1].finish_reason == "stop"
    assert len([t for d in step_by_step["stop-string"] for t in d.token_ids]) < 24  # the stop string ended it
    assert step_by_step["stop-token"][-1].token_ids == (free_run[1][5],)
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert not engine.scheduler.requests and not engine._sequences


def test_a_stop_string_found_a_step_late_costs_one_dropped_token(tiny_model_dir, make_engine_for, free_run):
    """The checks without text (stop token, length) end a sequence before the next step is
    scheduled; a stop string only once its text is made, while that step runs."""
    requests = _requests(*free_run)
    counts = {}
    for overlap in (False, True):
        engine = make_engine_for(tiny_model_dir)
        scheduled = _count_scheduled_tokens(engine)
        deltas = _run(engine, requests, overlap)
        outputs = {rid: sum(len(d.token_ids) for d in ds) for rid, ds in deltas.items()}
        counts[overlap] = {rid: scheduled[rid] - outputs[rid] for rid in ("stop-string", "stop-token", "length")}
    prompt_lengths = {rid: counts[False][rid] for rid in counts[False]}  # each prompt, less its last token
    assert counts[True] == {**prompt_lengths, "stop-string": prompt_lengths["stop-string"] + 1}


def _count_scheduled_tokens(engine) -> dict[str, int]:
    """request id -> tokens the engine's steps computed for it (spied on the scheduler)."""
    counts: dict[str, int] = {}
    schedule = engine.scheduler.schedule

    def counting():
        step_input = schedule()
        for request_id, count in step_input.num_scheduled_tokens.items():
            counts[request_id] = counts.get(request_id, 0) + count
        return step_input

    engine.scheduler.schedule = counting
    return counts


def test_the_text_is_made_while_the_step_runs_before_its_tokens_are_waited_for(tiny_model_dir, make_engine_for):
    """In the worker's step, after its kernels are queued (the sampler was called), right before
    the host waits for the tokens: each delivery but the first token's (at once: TTFT) and the
    last (no step follows it) happens there."""
    engine = make_engine_for(tiny_model_dir)
    worker = engine.executor.worker
    sampler, events = worker.sampler, []

    def spied_sampler(logits, states, before_sync=None):
        events.append("sampler")

        def spied_before_sync():
            events.append("wait begins")
            if before_sync is not None:
                before_sync()
            events.append("wait ends")

        return sampler(logits, states, before_sync=spied_before_sync)

    worker.sampler = spied_sampler
    engine.add_request("one", PROMPTS[0], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step(lambda deltas: events.append(f"deliver {len(deltas)}"))
    # Step 1 (the prompt) delivers its first token at once (TTFT); step 2 has nothing to deliver;
    # steps 3-5 deliver tokens 2-4 inside their wait; token 5 ended the request (its length), so
    # step 6 only tells the worker to drop it, and delivers token 5 at its end.
    assert events == (["sampler", "wait begins", "wait ends", "deliver 1"]
                      + ["sampler", "wait begins", "wait ends"]
                      + ["sampler", "wait begins", "deliver 1", "wait ends"] * 3 + ["deliver 1"])


def test_an_abort_while_a_step_s_text_is_unmade_drops_that_text(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir)
    engine.add_request("kept", PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    engine.add_request("aborted", PROMPTS[1], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    delivered: list[CompletionDelta] = []
    for _ in range(3):
        engine.step(delivered.extend)
    before = [d for d in delivered if d.request_id == "aborted"]
    (abort,) = engine.abort_request("aborted")  # its third token's text is not made yet
    while engine.has_unfinished_requests():
        engine.step(delivered.extend)
    assert abort.finish_reason == "abort" and len(before) == 2
    assert [d for d in delivered if d.request_id == "aborted"] == before
    assert sum(len(d.token_ids) for d in delivered if d.request_id == "kept") == 6
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_a_failure_making_one_request_s_text_overlapped_ends_it_alone(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir)
    engine.add_request("broken", PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    engine.add_request("fine", PROMPTS[1], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))

    def broken_detokenizer(token_id, finish_status):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    engine._sequences["broken"].output.text = broken_detokenizer
    delivered: list[CompletionDelta] = []
    while engine.has_unfinished_requests():
        engine.step(delivered.extend)
    (broken,) = [d for d in delivered if d.request_id == "broken"]
    assert broken.finish_reason == "error" and "injected" in broken.error
    assert sum(len(d.token_ids) for d in delivered if d.request_id == "fine") == 6
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_a_delivery_that_fails_fails_the_step_outside_the_worker(tiny_model_dir, make_engine_for):
    """The worker's handlers take a sampling error for one request's: the delivery's error must
    not reach them; it is raised by the engine's step, as a delivery outside the step would."""
    engine = make_engine_for(tiny_model_dir)
    engine.add_request("one", PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    engine.step(lambda deltas: None)  # step 1: the first token, delivered at once

    def failing(deltas):
        raise BrokenPipeError("the stream's reader went away")

    engine.step(failing)  # step 2: its token's text is held for the next step
    with pytest.raises(BrokenPipeError):  # made and delivered while step 3 runs: lost without the raise
        engine.step(failing)


def _sleep_on_rank(context, seconds: float) -> None:
    time.sleep(seconds)


def test_rank_processes_run_the_overlapped_work_while_the_ranks_step(world2):
    """LocalProcessExecutor: the work runs once the call is sent, before rank 0's answer."""
    ran_at = []
    sent_at = time.perf_counter()
    world2.call_first(_sleep_on_rank, 0.3, while_waiting=lambda: ran_at.append(time.perf_counter()))
    answered_at = time.perf_counter()
    assert len(ran_at) == 1 and ran_at[0] - sent_at < 0.1 and answered_at - sent_at >= 0.3
