"""DeepSeek-V4 in model_shards against transformers' FULL forward over the whole sequence.

The reference is one `DeepseekV4ForCausalLM(ids, use_cache=False)` call over the whole sequence:
transformers' own cached generate() was seen to disagree with it. Our model runs the same
sequence as one chunk, as odd-sized chunks, token by token (decode), and resumed from a saved
state that ends inside a compression window; every variant must give the reference's logits.

Tolerance 1e-4 absolute on logits of magnitude ~20 (float32): the computations are the same but
grouped differently (query blocks, chunked matmuls, per-token decode), which moves float32 results
by ~1e-5 here; any semantic slip (an entry visible one token early, a window off by one, a wrong
RoPE position) moves logits by 1e-2 or more. Prompts are 150-200 tokens: 18-25 sliding windows,
37-50 CSA entries (so the top-4 indexer really selects) and 9-12 HCA entries.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4ForCausalLM as ReferenceModel

from model_folder.deepseek_v4_config import CSA, HCA
from model_folder.errors import ModelFolderError
from model_shards.deepseek_v4.indexer import top_k_earliest_first
from model_folder.deepseek_v4_kv_budget import entry_bytes, kv_bytes_per_token, max_fixed_bytes_per_request
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.weights import canonical_name

ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def v4_folder(tmp_path_factory):
    return make_deepseek_v4_model(tmp_path_factory.mktemp("v4-tiny"), "deepseek-v4-tiny", seed=0)


@pytest.fixture(scope="session")
def reference(v4_folder):
    return ReferenceModel.from_pretrained(v4_folder).eval()


@pytest.fixture(scope="session")
def model(v4_folder):
    return DeepseekV4ForCausalLM.from_folder(v4_folder, dtype=torch.float32)


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (length,), generator=generator)  # the tokenizer's ordinary ids


def full_forward(reference, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(ids[None], use_cache=False).logits[0]  # (T, vocab)


def run_chunks(model, ids: torch.Tensor, chunk: int, state=None) -> torch.Tensor:
    state = state if state is not None else model.new_state()
    return torch.cat([model.compute_logits(model(ids[i:i + chunk], state)) for i in range(0, len(ids), chunk)])


def test_whole_prompt_logits_equal_the_full_forward(model, reference):
    ids = prompt(200)
    expected = full_forward(reference, ids)
    torch.testing.assert_close(run_chunks(model, ids, len(ids)), expected, atol=ATOL, rtol=0)
    assert expected.argmax(-1).unique().numel() > 100  # a model that says many different things


@pytest.mark.parametrize("chunk", [1, 3, 7, 13, 64])
def test_chunked_prefill_equals_the_full_forward(model, reference, chunk):
    ids = prompt(150, seed=chunk)
    torch.testing.assert_close(run_chunks(model, ids, chunk), full_forward(reference, ids), atol=ATOL, rtol=0)


def test_greedy_decode_equals_the_full_forward(model, reference):
    """Prefill 61 tokens, decode 60 greedily one token at a time; the full forward over the
    final sequence gives the same logits at every step, so the same greedy tokens."""
    ids = prompt(61, seed=5)
    state = model.new_state()
    step_logits = [model.compute_logits(model(ids, state))[-1]]
    generated = []
    for _ in range(60):
        generated.append(int(step_logits[-1].argmax()))
        step_logits.append(model.compute_logits(model(torch.tensor(generated[-1:]), state))[-1])
    sequence = torch.cat([ids, torch.tensor(generated)])
    expected = full_forward(reference, sequence)[len(ids) - 1:]  # logits predicting each generated token
    torch.testing.assert_close(torch.stack(step_logits), expected, atol=ATOL, rtol=0)
    assert generated == expected[:-1].argmax(-1).tolist()
    assert len(set(generated)) > 20


def test_resume_from_a_state_saved_inside_compression_windows(model, reference):
    """A prefix hit: 57 tokens end 1 token into a CSA window and 9 into an HCA window. Two different
    continuations from the one saved state each equal the full forward; the saved state is untouched."""
    prefix = prompt(57, seed=11)
    state = model.new_state()
    model(prefix, state)
    saved = state.snapshot()
    for seed in (12, 13):
        suffix = prompt(40, seed=seed)
        resumed = saved.snapshot()
        got = run_chunks(model, suffix, 5, resumed)
        expected = full_forward(reference, torch.cat([prefix, suffix]))[len(prefix):]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        assert resumed.num_tokens == 97 and saved.num_tokens == 57
    csa = saved.layers[1].compressor
    assert (csa.num_entries, csa.pending_kv.shape[0], saved.layers[2].compressor.pending_kv.shape[0]) == (14, 1, 9)


def test_state_bytes_agree_with_the_config(model):
    length = 1003
    state = model.new_state()
    model(prompt(length, seed=3), state)
    measured = state.nbytes()
    expected = entry_bytes(model.arch, length, element_bytes=4)  # float32 model
    assert {t: measured[f"{t}/entries"] for t in (CSA, HCA)} == expected
    per_token = kv_bytes_per_token(model.arch, element_bytes=4)
    for layer_type in (CSA, HCA):  # the per-token figure, up to the one open window
        assert abs(measured[f"{layer_type}/entries"] - length * per_token[layer_type]) <= per_token[layer_type] * 16
    fixed = sum(value for key, value in measured.items() if key.endswith("/fixed"))
    assert 0 < fixed <= max_fixed_bytes_per_request(model.arch, element_bytes=4)


def test_sharded_checkpoint_loads_to_the_same_model(model, reference, tmp_path):
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    sharded = DeepseekV4ForCausalLM.from_folder(tmp_path, dtype=torch.float32)
    ids = prompt(40, seed=21)
    torch.testing.assert_close(run_chunks(sharded, ids, 40), run_chunks(model, ids, 40), atol=0, rtol=0)


def test_exact_score_ties_go_to_the_earliest_entries():
    scores = torch.tensor([[0.0, 3.0, 0.0, 0.0, 1.0, float("-inf")],
                           [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
                           [1.0, float("-inf"), float("-inf"), float("-inf"), float("-inf"), float("-inf")]])
    assert top_k_earliest_first(scores, 3).tolist() == [[0, 1, 4], [0, 1, 2], [0, 1, 2]]


def test_chunking_cannot_change_a_model_with_frequent_ties(tmp_path):
    """With 4 indexer heads, whole groups of entries score exactly 0 (every head's ReLU at zero),
    often at the top-k boundary: transformers' full forward then depends on the sequence's length
    (torch.topk's tie order), ours picks the earliest entries whatever the chunking."""
    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=0, index_n_heads=4)
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
    ids = prompt(150)
    whole = run_chunks(model, ids, 150)
    for chunk in (1, 7):
        torch.testing.assert_close(run_chunks(model, ids, chunk), whole, atol=ATOL, rtol=0)


def test_the_cli_generates_on_v4_folders_and_refuses_a_block_size_that_splits_a_window(v4_folder, capsys):
    """The block size is derived (16: the lcm of compress rates 4 and 16); 24 would cut windows."""
    from cluster.cli import main

    args = ["generate", "--model", str(v4_folder), "--prompt", "hello there", "--max-tokens", "4", "--json",
            "--num-kv-blocks", "64"]
    assert main(args) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["kv"]["block_size"] == 16 and 1 <= len(output["token_ids"]) <= 4
    assert main([*args, "--block-size", "24"]) != 0
    error = capsys.readouterr().err
    assert "cache.block_size 24 must be a multiple of 16" in error and error.count("\n") == 1


def test_deepseek_spelling_of_the_checkpoint_loads_alike(model, v4_folder, tmp_path):
    """DeepSeek's own names (no `model.` prefix, embed.weight, hc_head_fn, ...) and an mtp layer,
    which serving skips, give the same model as transformers' spelling."""
    tensors = load_file(v4_folder / "model.safetensors")
    renamed = {canonical_name(name): tensor for name, tensor in tensors.items()}
    assert "embed.weight" in renamed and "hc_head_fn" in renamed and "layers.1.attn.indexer.wq_b.weight" in renamed
    renamed["mtp.0.ffn.gate.weight"] = torch.zeros(2, 2)
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((v4_folder / "config.json").read_text())
    deepseek_spelled = DeepseekV4ForCausalLM.from_folder(tmp_path, dtype=torch.float32)
    ids = prompt(30, seed=4)
    torch.testing.assert_close(run_chunks(deepseek_spelled, ids, 30), run_chunks(model, ids, 30), atol=0, rtol=0)


def test_a_tensor_the_model_does_not_know_is_refused(v4_folder, tmp_path):
    tensors = load_file(v4_folder / "model.safetensors")
    save_file({**tensors, "model.layers.0.attn.extra.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((v4_folder / "config.json").read_text())
    with pytest.raises(ModelFolderError, match="unexpected tensors in the checkpoint: \\['model.layers.0.attn.extra"):
        DeepseekV4ForCausalLM.from_folder(tmp_path)
    del tensors["model.layers.2.attn.compressor.ape"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelFolderError, match="'layers.2.attn.compressor.ape' .* is missing"):
        DeepseekV4ForCausalLM.from_folder(tmp_path)
