"""Tensor parallelism over any vocabulary, and a plain error for heads it cannot split.

A vocabulary that TP does not divide (415 over 2 ranks) is padded to a multiple of tp: the
logits of TP=2 equal one rank's (float32, 1e-4, as test_tp_sp_logits.py) on a folder written by
transformers itself, with exactly `vocab` columns (the padding column never reaches a sampler),
and greedy generation through the engine equals one rank's. A TP size that the heads or the MLP
do not divide fails before any rank starts, with one line naming the sizes that work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from engine_configs import config_for
from rank_jobs import run_model_steps
from test_tp_sp_logits import BLOCK_SIZE, NUM_BLOCKS, assemble, assert_same_logits

from cluster.cli import main
from engine.llm_engine import LLMEngine
from engine.offline import generate
from executors.local import LocalProcessExecutor
from model_folder.hf_config import load_architecture
from model_shards.make_model import make_model
from model_shards.rank import RankContext
from protocol.sampling_params import SamplingParams

ODD_VOCAB = 415  # 208 rows per rank under TP 2, the last one padding


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory) -> Path:
    """A Llama written by transformers' save_pretrained, vocabulary 415. initializer_range 0.5
    gives logits of std ~4 (hidden 64), so that 1e-4 is a tight bound."""
    config = LlamaConfig(vocab_size=ODD_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         initializer_range=0.5, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf-odd-vocab")
    HFLlama(config).save_pretrained(folder)
    return folder


def odd_vocab_scenario():
    """Token ids over the whole vocabulary, the last id (on the padded rank) among them."""
    ids = torch.randint(0, ODD_VOCAB, (30,), generator=torch.Generator().manual_seed(7)).tolist()
    sequence = ids[:20] + [ODD_VOCAB - 1, 0, 207, 208] + ids[20:]
    return {"a": (list(range(10)), sequence, 0)}, [{"a": 27}, {"a": 1}, {"a": 1}, {"a": 5}]


def test_tp2_over_an_odd_vocabulary_equals_one_rank(transformers_folder, world2):
    sequences, schedule = odd_vocab_scenario()
    args = (BLOCK_SIZE, NUM_BLOCKS, sequences, schedule)
    single = assemble([run_model_steps(RankContext(0, 1, torch.device("cpu")), transformers_folder, 1, 1, *args)])
    parallel = assemble(world2.call(run_model_steps, transformers_folder, 2, 1, *args))
    assert all(logits.shape == (ODD_VOCAB,) for step in parallel for rows in step.values() for logits in rows.values())
    assert_same_logits(parallel, single, "tp2 vocab 415")


def test_engine_with_tp2_over_an_odd_vocabulary_generates_what_one_rank_does(tmp_path, world2):
    folder = make_model(tmp_path / "odd", "tiny", seed=5, vocab_size=1031)  # 1031 is prime
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = ["The quick brown fox", [5, 1030, 516, 515, 17]]
    one = [r[0].token_ids for r in generate(LLMEngine(config_for(folder)), prompts, params)]
    executor = LocalProcessExecutor(config_for(folder, tp=2), processes=world2)
    try:
        two = [r[0].token_ids for r in generate(LLMEngine(config_for(folder, tp=2), executor=executor), prompts, params)]
    finally:
        executor.shutdown()
    assert two == one and all(0 <= t < 1031 for tokens in two for t in tokens)


def test_tensor_parallel_sizes_follow_heads_kv_heads_and_mlp(tiny_folder):
    arch = load_architecture(tiny_folder)  # 4 heads, 2 KV heads, intermediate 128
    assert arch.tensor_parallel_sizes() == [1, 2, 4]
    arch.check_tensor_parallel(4)  # 4 ranks: each of the 2 KV heads on 2 ranks
    with pytest.raises(ValueError, match="valid sizes: 1, 2, 4"):
        arch.check_tensor_parallel(3)


def test_cli_rejects_a_tp_size_the_heads_cannot_split_in_one_line(tiny_folder, capsys):
    code = main(["generate", "--model", str(tiny_folder), "--device", "cpu", "--prompt", "hi", "--tp", "3"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and "Traceback" not in error
    assert error.startswith("longctx: error: tensor parallel size 3 cannot split this model (4 attention heads, "
                            "2 KV heads") and error.rstrip().endswith("valid sizes: 1, 2, 4")
