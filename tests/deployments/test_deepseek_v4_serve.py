"""A DeepSeek-V4 folder behind the OpenAI API (the LLM server `longctx serve` deploys, in this
process), through the official `openai` client: completions, streamed chat with the folder's chat
template, structured output, each equal to the engine called directly."""

from __future__ import annotations

import pytest

from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_folder.tokenizer import Tokenizer
from protocol.sampling_params import SamplingParams

MODEL = "v4-tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a compressed KV cache?"}]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def v4_config(tmp_path_factory) -> LongctxConfig:
    from model_shards.deepseek_v4.presets import make_deepseek_v4_model

    folder = make_deepseek_v4_model(tmp_path_factory.mktemp("v4-serve") / MODEL, "deepseek-v4-tiny", seed=4)
    return LongctxConfig(model=ModelSettings(path=str(folder), dtype="float32", device="cpu"),
                         cache=CacheSettings(cpu_kv_bytes=8 << 20),
                         scheduler=SchedulerSettings(max_tokens_per_step=64, max_num_seqs=8))


@pytest.fixture(scope="module")
def v4_openai(v4_config):
    import openai
    from fastapi.testclient import TestClient

    from deployments.api import OpenAIService, build_api
    from deployments.llm_server import LLMServer
    from deployments.local_backend import LocalBackend
    from deployments.prompts import PromptBuilder

    server = LLMServer(v4_config)
    service = OpenAIService(LocalBackend(server), PromptBuilder.from_config(v4_config), v4_config.serve, MODEL)
    with TestClient(build_api(service), base_url="http://in-process") as http:
        yield openai.OpenAI(base_url="http://in-process/v1", api_key="unused", max_retries=0, http_client=http)
    server.engine.shutdown()


@pytest.fixture(scope="module")
def direct_engine(v4_config):
    """The engine called directly: what the API must reproduce."""
    engine = LLMEngine(v4_config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def direct(direct_engine):
    return lambda prompt, max_tokens: generate(direct_engine, [prompt], SamplingParams(max_tokens=max_tokens,
                                                                                       temperature=0.0))[0][0]


def test_completion_equals_the_engine(v4_openai, direct):
    prompt = "The paged hybrid cache keeps compressed entries " * 6  # ~100 tokens: several blocks
    reply = v4_openai.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    expected = direct(prompt, 12)
    assert reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == expected.num_prompt_tokens > 64


def test_streamed_chat_renders_the_template_and_equals_the_whole_reply(v4_openai, direct, v4_config):
    tokenizer = Tokenizer.from_folder(v4_config.model.path)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(CHAT), add_special_tokens=False)  # BOS is in the text
    whole = v4_openai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    chunks = list(v4_openai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                                    stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == whole.choices[0].message.content == direct(prompt_ids, 10).text
    assert whole.usage.prompt_tokens == len(prompt_ids)


def test_json_object_output_opens_an_object(v4_openai):
    reply = v4_openai.chat.completions.create(model=MODEL, messages=CHAT, response_format={"type": "json_object"},
                                              max_tokens=6, temperature=0)
    assert reply.choices[0].message.content.startswith("{")


def test_echo_with_logprobs_scores_a_token_prompt_as_the_engine_does(v4_openai, direct_engine):
    """lm-eval's loglikelihood request: token ids, echo, logprobs, max_tokens 0. The prompt is
    70 tokens, so the server's 64-token steps split it inside a compression window."""
    prompt = [(7 * i) % 900 + 3 for i in range(70)]
    reply = v4_openai.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    expected = generate(direct_engine, [prompt], SamplingParams(max_tokens=0, prompt_logprobs=2))[0][0]
    logprobs = reply.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.token_logprobs) == len(prompt)
    assert logprobs.token_logprobs[1:] == pytest.approx([t.logprob for t in expected.prompt_logprobs], abs=1e-5)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs[1:])  # keyed by text: equal texts merge
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 0
