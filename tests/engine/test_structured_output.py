"""Structured outputs in the engine: a random-weight model's output follows the request's JSON
schema (xgrammar's token mask on the worker), mixed in a batch with free requests, through
preemptions (the grammar replays the tokens already produced), and a schema that cannot
compile fails loudly."""

from __future__ import annotations

import json

import pytest

from engine.offline import generate
from protocol.sampling_params import SamplingParams, StructuredOutput

pytest.importorskip("xgrammar")

TRIP = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "return": {"type": "boolean"},
    },
    "required": ["city", "days", "return"],
}
TRIP_OUTPUT = StructuredOutput("json_schema", json.dumps(TRIP))


def _assert_trip(text: str) -> None:
    trip = json.loads(text)
    assert set(trip) == {"city", "days", "return"}
    assert trip["city"] in TRIP["properties"]["city"]["enum"] and 1 <= trip["days"] <= 9
    assert isinstance(trip["return"], bool)


def test_outputs_follow_the_schema_beside_free_requests(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir)
    constrained = [SamplingParams(max_tokens=64, structured_output=TRIP_OUTPUT),
                   SamplingParams(max_tokens=64, temperature=1.0, seed=5, n=3, structured_output=TRIP_OUTPUT)]
    free = SamplingParams(max_tokens=16, ignore_eos=True)
    results = generate(engine, ["Plan a trip", "Another trip", "Free text"], [*constrained, free])
    for sequence in results[0] + results[1]:
        assert sequence.finish_reason == "stop"
        _assert_trip(sequence.text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(results[2][0].text)  # the free request's output: this model's random text


def test_a_preempted_request_resumes_in_its_grammar(tiny_model_dir, make_engine_for):
    params = SamplingParams(max_tokens=40, structured_output=TRIP_OUTPUT)  # greedy: comparable across runs
    prompts = [[1, *range(40 + 10 * i, 70 + 10 * i)] for i in range(4)]
    roomy = generate(make_engine_for(tiny_model_dir), prompts, params)
    tight_engine = make_engine_for(tiny_model_dir, num_blocks=30, budget=16)
    tight = generate(tight_engine, prompts, params)
    assert tight_engine.scheduler.num_preemptions_total > 0
    assert [s[0].text for s in tight] == [s[0].text for s in roomy]
    for sequences in tight:
        _assert_trip(sequences[0].text)


def test_a_schema_that_cannot_compile_fails_its_request_alone(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir)
    bad = StructuredOutput("json_schema", json.dumps({"type": "strin"}))
    failed = generate(engine, ["x"], SamplingParams(max_tokens=4, structured_output=bad))[0][0]
    assert failed.error is not None and "grammar could not be compiled" in failed.error
    ok = generate(engine, ["x"], SamplingParams(max_tokens=4))[0][0]  # the engine goes on
    assert ok.error is None and len(ok.token_ids) == 4


def test_with_ignore_eos_the_output_runs_on_after_its_json(tiny_model_dir, make_engine_for):
    params = SamplingParams(max_tokens=60, ignore_eos=True, structured_output=TRIP_OUTPUT)
    result = generate(make_engine_for(tiny_model_dir), ["Plan a trip"], params)[0][0]
    assert len(result.token_ids) == 60
    trip, end = json.JSONDecoder().raw_decode(result.text)
    _assert_trip(json.dumps(trip))
    assert end < len(result.text)  # free text after the object: the grammar ended, the row was let go
