"""Greedy generation through the whole engine with the multiprocess executor equals one rank:
TP 2, SP 2 and TP 2 x SP 2, with a prefix-cache hit, chunked prefill and a mixed batch; and
`longctx generate --tp/--sp` spawns its own ranks and prints what one rank prints."""

from __future__ import annotations

import json

import pytest
from engine_configs import config_for, prompt

from cluster.cli import main
from engine.llm_engine import LLMEngine
from engine.offline import generate
from executors.local import LocalProcessExecutor
from protocol.sampling_params import SamplingParams

LAYOUTS = {"tp2": (2, 1, "world2"), "sp2": (1, 2, "world2"), "tp2xsp2": (2, 2, "world4")}


def token_ids(results) -> list[list[int]]:
    return [sequences[0].token_ids for sequences in results]


def run_workload(engine: LLMEngine) -> tuple[list[list[int]], list[int], int]:
    """A mixed batch (a long prompt chunked beside short ones), then the long prompt again: a
    prefix-cache hit. Returns the batch's tokens, the repeat's tokens and its hit count."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [prompt(1, 61), prompt(2, 7), prompt(3, 1)]
    batch = token_ids(generate(engine, prompts, params))
    repeat = generate(engine, [prompts[0]], params)[0][0]
    return batch, repeat.token_ids, repeat.num_prefix_hit_tokens


@pytest.fixture(scope="module")
def single_rank(tiny_folder):
    engine = LLMEngine(config_for(tiny_folder, budget=24))
    return run_workload(engine)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_engine_with_multiprocess_executor_equals_one_rank(layout, tiny_folder, single_rank, request):
    tp, sp, world = LAYOUTS[layout]
    config = config_for(tiny_folder, tp, sp, budget=24)  # the 61-token prompt takes several steps
    executor = LocalProcessExecutor(config, processes=request.getfixturevalue(world))
    try:
        batch, repeat, hits = run_workload(LLMEngine(config, executor=executor))
    finally:
        executor.shutdown()
    assert batch == single_rank[0]
    assert repeat == single_rank[1] == batch[0]
    assert hits == single_rank[2] == 60  # 15 full blocks of 4; the last token is recomputed
    assert f"tp={tp}|sp={sp}" in executor.kv_layout


def test_generate_cli_with_tp_and_sp_prints_what_one_rank_prints(tiny_folder, capsys):
    args = ["generate", "--model", str(tiny_folder), "--dtype", "float32", "--device", "cpu", "--block-size", "4",
            "--num-kv-blocks", "128", "--prompt", "The quick brown fox", "--max-tokens", "8", "--json"]
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(args + ["--tp", "2", "--sp", "2"]) == 0
    parallel = json.loads(capsys.readouterr().out)
    assert parallel["token_ids"] == one["token_ids"] and parallel["text"] == one["text"]
