"""TP x SP ranks as Ray actors in a placement group (the layout a Serve replica reserves): greedy
generation equals one rank, and the KV layout names the parallel layout."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from engine_configs import config_for, prompt  # noqa: E402

from engine.llm_engine import LLMEngine  # noqa: E402
from engine.offline import generate  # noqa: E402
from executors.placement import placement_group_bundles  # noqa: E402
from executors.ray_actors import RayActorExecutor  # noqa: E402
from protocol.sampling_params import SamplingParams  # noqa: E402


@pytest.mark.parametrize("tp, sp", [(1, 2), (2, 2)])
def test_ray_actor_ranks_generate_what_one_rank_generates(local_ray, tiny_folder, tp, sp):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [prompt(11, 29), prompt(12, 3)]
    expected = [s[0].token_ids for s in generate(LLMEngine(config_for(tiny_folder)), prompts, params)]
    config = config_for(tiny_folder, tp=tp, sp=sp)
    group = ray.util.placement_group(placement_group_bundles(config), strategy="STRICT_PACK")
    ray.get(group.ready())

    @ray.remote(num_cpus=0)
    def run_in_group():  # the engine runs where a replica would: inside the placement group
        executor = RayActorExecutor(config)
        try:
            results = generate(LLMEngine(config, executor=executor), prompts, params)
            return [s[0].token_ids for s in results], executor.kv_layout
        finally:
            executor.shutdown()

    strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
    tokens, kv_layout = ray.get(run_in_group.options(scheduling_strategy=strategy).remote())
    assert tokens == expected
    assert f"tp={tp}|sp={sp}" in kv_layout
    ray.util.remove_placement_group(group)
