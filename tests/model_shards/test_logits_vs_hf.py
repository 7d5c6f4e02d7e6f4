"""Our Llama-family model gives transformers' logits: every RoPE method, GQA ratio, architecture.

Tolerance: 1e-4 absolute, on logits of std ~4 (make_model scales its random weights so).
Both sides compute in float32 with the same operations; only accumulation order differs (fused
q|k|v and gate|up GEMMs, SDPA over a gathered paged context against HF's eager attention), which
moves results by ~1e-6 relative. 1e-4 is a safe bound and still tight: a wrong RoPE base, mask or
head mapping moves logits by O(1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from model_folder.hf_config import load_architecture
from model_shards.attention import AttentionMetadata
from model_shards.kv_cache import KVCacheTensors
from model_shards.llama import LlamaForCausalLM
from model_shards.rope import RotaryEmbedding, _dynamic_inv_freq, initial_inv_freq

TOLERANCE = 1e-4
BLOCK_SIZE = 4
PROMPT_LEN = 38  # 9.5 blocks: the prompt ends in a partial block
DECODE_STEPS = 8
NUM_BLOCKS = 32

VARIANTS = {
    "rope_none_mha": {},
    "rope_linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    # max_position_embeddings below the prompt: the NTK base is stretched from the prefill on
    "rope_dynamic_active": {"max_position_embeddings": 32,
                            "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    # ... and here it starts stretching in the middle of decoding (38 + 8 crosses 42)
    "rope_dynamic_crossing": {"max_position_embeddings": 42,
                              "rope_scaling": {"rope_type": "dynamic", "factor": 3.0}},
    "rope_yarn": {"max_position_embeddings": 128,
                  "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 32}},
    # original 64 puts the 16-dim head's frequencies in all three llama3 bands
    "rope_llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}},
    "gqa_4": {"num_key_value_heads": 2},
    "gqa_8_mqa": {"num_key_value_heads": 1},
    "qwen2_qkv_bias": {"architecture": "qwen2", "num_key_value_heads": 2},
    "tied_embeddings": {"tie_word_embeddings": True},
    "mistral": {"architecture": "mistral", "num_key_value_heads": 2},
}


def load_hf(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def random_tokens(count: int, vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (count,), generator=torch.Generator().manual_seed(seed))


def scattered_blocks(count: int, seed: int) -> list[int]:
    """Non-contiguous, unordered block ids: catches any assumption that tables are ranges."""
    return torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed))[:count].tolist()


class PagedSequences:
    """Drives several sequences through our model, one flattened batch per step."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCacheTensors,
                 tables: dict[str, list[int]]):
        self.model, self.kv_cache, self.tables = model, kv_cache, tables
        self.computed = {name: 0 for name in tables}

    def step(self, chunks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Feed each named sequence its next tokens; logits (len(chunk), vocab) per sequence."""
        names = list(chunks)
        metadata = AttentionMetadata.build(
            [(self.tables[name], self.computed[name], len(chunks[name])) for name in names],
            BLOCK_SIZE, self.model.device)
        input_ids = torch.cat([chunks[name] for name in names])  # (T,)
        logits = self.model.compute_logits(
            self.model(input_ids, metadata.positions, metadata, self.kv_cache))  # (T, vocab)
        for name in names:
            self.computed[name] += len(chunks[name])
        rows = metadata.query_start_loc
        return {name: logits[rows[i]:rows[i + 1]] for i, name in enumerate(names)}


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    difference = (ours - theirs.float()).abs().max().item()
    assert difference <= TOLERANCE, f"{what}: max |logit difference| {difference:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_decode_logits_equal_transformers(variant, model_folder):
    folder = model_folder(**VARIANTS[variant])
    hf = load_hf(folder)
    ours = LlamaForCausalLM.from_folder(folder, dtype=torch.float32)
    blocks = scattered_blocks(-(-(PROMPT_LEN + DECODE_STEPS) // BLOCK_SIZE), seed=2)
    sequence = PagedSequences(ours, ours.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE), {"s": blocks})
    prompt = random_tokens(PROMPT_LEN, ours.arch.vocab_size, seed=1)

    with torch.no_grad():
        reference = hf(prompt[None], use_cache=True)
    assert_close(sequence.step({"s": prompt})["s"], reference.logits[0], "prefill, all positions")

    past = reference.past_key_values
    for step in range(DECODE_STEPS):
        token = reference.logits[0, -1].argmax().view(1)  # the same greedy token for both
        with torch.no_grad():
            reference = hf(token[None], past_key_values=past, use_cache=True)
        past = reference.past_key_values
        assert_close(sequence.step({"s": token})["s"], reference.logits[0], f"decode step {step}")


@pytest.fixture
def kernels_on_the_cpu(monkeypatch):
    """The fused layer kernels take every call they are enabled for, in Triton's interpreter here;
    the list of those calls' `enabled`."""
    from model_shards import layer_kernels

    calls = []
    monkeypatch.setattr(layer_kernels, "fused_kernels_run", lambda enabled, *tensors: calls.append(enabled) or enabled)
    return calls


@pytest.mark.parametrize("variant", ["gqa_4", "qwen2_qkv_bias", "rope_yarn"])
def test_fused_layer_kernels_give_transformers_logits(variant, model_folder, kernels_on_the_cpu):
    """The layers with their norms, residual adds, RoPE and SiLU as the fused kernels
    (model_shards/layer_kernels.py), prefill then decode: the plumbing of the residual stream
    between layers and q | k | v out of the fused projection, against transformers."""
    folder = model_folder(**VARIANTS[variant])
    hf = load_hf(folder)
    ours = LlamaForCausalLM.from_folder(folder, dtype=torch.float32)
    assert all(layer.mlp.fused for layer in ours.layers)
    sequence = PagedSequences(ours, ours.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE), {"s": scattered_blocks(12, seed=2)})
    prompt = random_tokens(PROMPT_LEN, ours.arch.vocab_size, seed=1)
    with torch.no_grad():
        reference = hf(prompt[None], use_cache=True)
    assert_close(sequence.step({"s": prompt})["s"], reference.logits[0], "prefill, fused kernels")
    calls = kernels_on_the_cpu
    assert len(calls) == 4 * ours.arch.num_hidden_layers + 1 and all(calls)  # 4 a layer, the final norm
    token = reference.logits[0, -1].argmax().view(1)
    with torch.no_grad():
        reference = hf(token[None], past_key_values=reference.past_key_values, use_cache=True)
    assert_close(sequence.step({"s": token})["s"], reference.logits[0], "decode, fused kernels")


def test_flattened_batch_equals_each_sequence_alone(model_folder):
    """Step 1: A's whole prompt + B's first chunk. Step 2: A's first decode token + B's second
    chunk (a chunk at the end of a longer context: the bottom-right-aligned causal mask)."""
    ours = LlamaForCausalLM.from_folder(model_folder(num_key_value_heads=2), dtype=torch.float32)
    prompt_a = random_tokens(13, ours.arch.vocab_size, seed=3)
    prompt_b = random_tokens(17, ours.arch.vocab_size, seed=4)
    blocks = scattered_blocks(12, seed=5)
    batch = PagedSequences(ours, ours.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE),
                           {"a": blocks[:6], "b": blocks[6:]})

    first = batch.step({"a": prompt_a, "b": prompt_b[:10]})
    token_a = first["a"][-1].argmax().view(1)
    second = batch.step({"a": token_a, "b": prompt_b[10:]})

    alone_a = PagedSequences(ours, ours.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE), {"a": blocks[:6]})
    assert_close(first["a"], alone_a.step({"a": prompt_a})["a"], "A's prompt")
    assert_close(second["a"], alone_a.step({"a": token_a})["a"], "A's decode token")
    alone_b = PagedSequences(ours, ours.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE), {"b": blocks[6:]})
    b_logits = alone_b.step({"b": prompt_b})["b"]
    assert_close(torch.cat([first["b"], second["b"]]), b_logits, "B's two chunks vs one prefill")


def test_attention_metadata_slots_follow_block_tables():
    metadata = AttentionMetadata.build([([7, 2, 5], 3, 3), ([4], 0, 1)], block_size=4, device="cpu")
    assert metadata.query_start_loc == [0, 3, 4]
    assert metadata.context_lens == [6, 1]
    assert metadata.positions.tolist() == [3, 4, 5, 0]
    # position 3 -> block 7 offset 3; positions 4, 5 -> block 2 offsets 0, 1; then block 4 offset 0
    assert metadata.slot_mapping.tolist() == [31, 8, 9, 16]


def test_attention_metadata_slots_equal_the_per_token_formula():
    """Slots from the touched blocks only equal table[p // B] * B + p % B for every position p,
    chunks starting and ending anywhere in a block, one token or several blocks, tables longer
    than the context (allocated ahead)."""
    generator = torch.Generator().manual_seed(0)
    for block_size in (1, 4, 16):
        for _ in range(200):
            table = torch.randperm(64, generator=generator)[:int(torch.randint(1, 20, (1,), generator=generator))]
            capacity = len(table) * block_size
            computed = int(torch.randint(0, capacity, (1,), generator=generator))
            new = int(torch.randint(1, capacity - computed + 1, (1,), generator=generator))
            metadata = AttentionMetadata.build([(table.tolist(), computed, new)], block_size, "cpu")
            expected = [int(table[p // block_size]) * block_size + p % block_size
                        for p in range(computed, computed + new)]
            assert metadata.slot_mapping.tolist() == expected, (block_size, table.tolist(), computed, new)


# --- RoPE tables against transformers' own functions ---------------------------------------------

ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_betas_attention_factor": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16,
                                    "beta_slow": 2, "attention_factor": 0.8,
                                    "original_max_position_embeddings": 32},
    "yarn_mscale_no_truncate": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0,
                                "mscale_all_dim": 0.5, "truncate": False,
                                "original_max_position_embeddings": 32},
    "llama3": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def write_config(folder: Path, rope_scaling: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
              "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
              "num_attention_heads": 8, "head_dim": 16, "max_position_embeddings": 64,
              "rope_theta": 500000.0, "rope_scaling": rope_scaling}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_frequencies_and_tables_equal_transformers(case, tmp_path):
    folder = write_config(tmp_path, ROPE_CASES[case])
    arch, hf_config = load_architecture(folder), LlamaConfig.from_pretrained(folder)
    hf_rotary = LlamaRotaryEmbedding(hf_config)
    inv_freq, attention_scaling = initial_inv_freq(arch)
    assert torch.equal(inv_freq, hf_rotary.inv_freq)
    assert attention_scaling == hf_rotary.attention_scaling

    # a fresh HF module per length: its dynamic state must not carry over between calls
    ours = RotaryEmbedding(arch, torch.float32, "cpu")
    for length in (40, 64, 65, 300):
        hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config)(
            torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])  # (1, L, head_dim)
        cos, sin = ours.cos_sin(torch.arange(length), [0, length], [length])  # (L, head_dim // 2)
        torch.testing.assert_close(torch.cat([cos, cos], -1), hf_cos[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.cat([sin, sin], -1), hf_sin[0], rtol=0, atol=1e-6)


def test_dynamic_ntk_base_equals_transformers_at_long_lengths(tmp_path):
    folder = write_config(tmp_path, ROPE_CASES["dynamic"])
    hf_config = LlamaConfig.from_pretrained(folder)
    for seq_len in (65, 4096, 1_000_000):
        expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, None, seq_len=torch.tensor(seq_len))
        assert torch.equal(_dynamic_inv_freq(500000.0, 16, 2.0, 64, seq_len), expected)


def test_transformers5_rope_parameters_are_read(tmp_path):
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=32,
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 123456.0},
                ).save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    arch = load_architecture(tmp_path)
    assert arch.rope_theta == 123456.0
    assert (arch.rope_scaling.rope_type, arch.rope_scaling.factor) == ("linear", 2.0)


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    first = load_architecture(write_config(tmp_path / "a", None))
    assert first.fingerprint() == load_architecture(write_config(tmp_path / "b", None)).fingerprint()
    scaled = load_architecture(write_config(tmp_path / "c", ROPE_CASES["linear"]))
    assert scaled.fingerprint() != first.fingerprint()
