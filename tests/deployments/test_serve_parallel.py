"""`longctx serve --tp 2` on the session's Ray (gloo on the CPU): the two tensor-parallel ranks run
as Ray actors in the LLM server replica's placement group, and greedy completions through the
official openai client equal what one rank generates."""

from __future__ import annotations

import time

import openai
import pytest

from cluster.cli import _parser, build_config
from engine.offline import generate
from protocol.sampling_params import SamplingParams

APP = "longctx-tp2"
MODEL = "tiny"
# ~1,040 tokens: three 512-token prefill chunks, so chunked prefill runs across the ranks too.
DOCUMENT = " ".join(f"clause {i} binds the parties." for i in range(70))
PROMPTS = ["The contract says that the tenant", DOCUMENT + " Who is bound?"]


@pytest.fixture(scope="module")
def tp2_url(model_dir, deployed_app):
    # The CLI's own flags, as a user types them; the KV settings match `reference_engine`.
    argv = ["serve", "--model", model_dir, "--tp", "2", "--block-size", "16", "--num-kv-blocks", "512",
            "--max-tokens-per-step", "512"]
    config = build_config(_parser().parse_args(argv)).with_overrides({"serve.ingress_num_cpus": 0.5})
    assert config.parallel.world_size == 2
    with deployed_app(config, APP) as url:
        yield url


def _replica_group(app: str) -> tuple[str, dict]:
    """The placement group Serve reserved for the app's one LLM server replica: (id, bundles)."""
    import ray

    groups = [(group_id, group) for group_id, group in ray.util.placement_group_table().items()
              if group["name"].startswith(f"SERVE_REPLICA::{app}#LLMServer#") and group["state"] == "CREATED"]
    assert len(groups) == 1, groups
    return groups[0][0], groups[0][1]["bundles"]


def _free_cpus_in_bundle(group_id: str, index: int) -> float:
    import ray

    return ray.available_resources().get(f"CPU_group_{index}_{group_id}", 0.0)


def test_the_two_ranks_are_ray_actors_in_the_replica_s_placement_group(tp2_url):
    group_id, bundles = _replica_group(APP)
    assert bundles == {0: {"CPU": 1.0}, 1: {"CPU": 1.0}, 2: {"CPU": 1.0}}  # the engine, then rank 0 and rank 1
    # Bundles 1 and 2 are fully taken: each holds a rank actor. An actor started outside the group
    # would leave its bundle free and take the CPU from the rest of the node.
    deadline = time.monotonic() + 10  # available resources are reported asynchronously
    while any(_free_cpus_in_bundle(group_id, i) for i in (0, 1, 2)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [_free_cpus_in_bundle(group_id, i) for i in (0, 1, 2)] == [0.0, 0.0, 0.0]


def test_greedy_completions_equal_one_rank_s(tp2_url, reference_engine):
    client = openai.OpenAI(base_url=f"{tp2_url}/v1", api_key="unused", max_retries=0, timeout=120)
    # ignore_eos: every comparison covers all 16 tokens, however early the random model's eos.
    one_rank = generate(reference_engine, PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    request = {"model": MODEL, "max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True}}
    for prompt, [expected] in zip(PROMPTS, one_rank):
        response = client.completions.create(prompt=prompt, **request)
        assert response.choices[0].text == expected.text
        assert response.usage.completion_tokens == len(expected.token_ids) == 16
    stream = client.completions.create(prompt=PROMPTS[0], stream=True, **request)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == one_rank[0][0].text
