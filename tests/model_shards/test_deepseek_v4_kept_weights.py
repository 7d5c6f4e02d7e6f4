"""model.quantized_weights: keep on the tiny preset's released folders (FP8 linears, FP8 or FP4
experts): the model holds the checkpoint's bytes, and off CUDA it computes exactly what the
dequantizing loader's model computes (the same dequantized values, the same torch ops), so the
logits are bit-equal. The kernels the model calls on a GPU run here in Triton's interpreter, on
the model's own kept weights (re-blocked groups and tensor-parallel parts included), within the
bound of docs/quantized_weights.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model_folder.deepseek_v4_quantization import BlockQuantization
from model_folder.errors import ModelFolderError
from model_shards.deepseek_v4.interpreter_numerics import gpu_bf16_numerics
from model_shards.deepseek_v4.kept_weights import Projection
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.quantized_experts import grouped_quantized_matmul
from model_shards.deepseek_v4.quantized_linear import Fp4RowWeight, Fp8BlockWeight, quantized_matmul
from model_shards.deepseek_v4.quantized_weights import _cuts_exactly
from model_shards.deepseek_v4.weights import CheckpointTensors
from model_shards.weights import WeightReader

VARIANTS = {"fp8-experts-ue8m0": BlockQuantization(scale_format="ue8m0", expert_format="fp8"),
            "fp4-experts-float": BlockQuantization(scale_format="float", expert_format="fp4")}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _kernel_tests():
    """The kernels' tests (--import-mode=importlib: not importable by name), for their bound."""
    spec = importlib.util.spec_from_file_location("kernel_tests", Path(__file__).with_name(
        "test_deepseek_v4_quantized_linear.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


assert_within_summation_order = _kernel_tests().assert_within_summation_order


@pytest.fixture(scope="module", params=list(VARIANTS))
def released(request, tmp_path_factory) -> Path:
    return make_deepseek_v4_model(tmp_path_factory.mktemp(request.param), "deepseek-v4-tiny", seed=5,
                                  quantization=VARIANTS[request.param])


def chunked_logits(model: DeepseekV4ForCausalLM, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    state, logits, start = model.new_state(), [], 0
    for size in chunks:
        logits.append(model.compute_logits(model(ids[start:start + size], state)))
        start += size
    return torch.cat(logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_weights_give_the_dequantizing_models_logits_bit_for_bit(released, dtype):
    ids = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(1))
    dequantized = DeepseekV4ForCausalLM.from_folder(released, dtype=dtype)
    kept = DeepseekV4ForCausalLM.from_folder(released, dtype=dtype, keep_quantized=True)
    expected = chunked_logits(dequantized, ids, [13, 11, 1, 1, 4])
    assert expected.abs().max() > 1.0
    assert torch.equal(chunked_logits(kept, ids, [13, 11, 1, 1, 4]), expected)
    attention, experts = kept.layers[1].self_attn, kept.layers[1].mlp.experts
    assert isinstance(attention.q_b_proj.quantized, Fp8BlockWeight) and attention.q_b_proj.weight is None
    assert attention.compressor.kv_proj.quantized is None  # stored in bf16: stays a parameter
    fp4 = json.loads((released / "config.json").read_text())["expert_dtype"] == "fp4"
    assert experts.gate_up is None and experts.kept["gate_up"].parts[0].layout is (Fp4RowWeight if fp4
                                                                                    else Fp8BlockWeight)
    assert len(experts.kept["gate_up"].parts) == (1 if fp4 else 2)  # FP8 w1|w3 of 32 rows cannot share blocks


def test_weight_bytes_count_the_quantized_bytes(released):
    """keep = dequantize - the float32 copies of the scaled weights + their stored values and scales."""
    dequantized = DeepseekV4ForCausalLM.from_folder(released, dtype=torch.float32)
    kept = DeepseekV4ForCausalLM.from_folder(released, dtype=torch.float32, keep_quantized=True)
    with safe_open(str(released / "model.safetensors"), "pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys() if not name.startswith("mtp.")}
    scaled = [name for name in tensors if name.endswith(".weight") and name[:-len("weight")] + "scale" in tensors]
    values = sum(tensors[name].nbytes + tensors[name[:-len("weight")] + "scale"].nbytes for name in scaled)
    float_copies = sum(tensors[name].shape[0] * tensors[name].shape[1] * 4 * (2 if tensors[name].dtype == torch.int8
                                                                             else 1) for name in scaled)
    assert kept.weight_nbytes() == dequantized.weight_nbytes() - float_copies + values
    assert kept.weight_nbytes() < 0.7 * dequantized.weight_nbytes()


def test_keep_is_a_no_op_on_a_folder_without_quantization(tmp_path):
    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=5)
    kept = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32, keep_quantized=True)
    plain = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
    ids = torch.arange(3, 12)
    assert kept.layers[0].self_attn.q_a_proj.quantized is None and kept.weight_nbytes() == plain.weight_nbytes()
    assert torch.equal(chunked_logits(kept, ids, [9]), chunked_logits(plain, ids, [9]))


def kept_projection(folder: Path, name: str, rows: int, cols: int, **shard) -> Projection:
    projection = Projection(cols, rows, torch.bfloat16)
    with WeightReader(folder) as reader:
        projection.load(CheckpointTensors(reader, keep_quantized=True), name, **shard)
    return projection


def test_the_models_kept_weights_through_the_kernels(released):
    """The Triton kernels on the model's own kept weights: o_a's second group starts inside a
    block (re-blocked), rank 1 of wq_b under TP2 too; routed experts in one grouped launch."""
    kept = DeepseekV4ForCausalLM.from_folder(released, dtype=torch.bfloat16, keep_quantized=True)
    attention, experts = kept.layers[1].self_attn, kept.layers[1].mlp.experts
    rank1 = kept_projection(released, "layers.1.attn.wq_b.weight", 64, 32, shard_dim=0, rank=1, world_size=2)
    weights = [attention.q_a_proj.quantized, *attention.o_a_proj.quantized_groups, rank1.quantized]
    assert rank1.quantized.out_features == 64
    generator = torch.Generator().manual_seed(2)
    with gpu_bf16_numerics():
        for weight in weights:
            x = torch.randn(5, weight.in_features, generator=generator).to(torch.bfloat16)
            assert_within_summation_order(quantized_matmul(x, weight), x, weight)
        gate_up = experts.kept["gate_up"].parts[0]
        rows = torch.randn(6, gate_up.expert(0).in_features, generator=generator).to(torch.bfloat16)
        offsets = torch.tensor([2, 3, 5, 6], dtype=torch.int32)
        out = grouped_quantized_matmul(rows, gate_up, offsets)
    for expert, (begin, end) in enumerate([(0, 2), (2, 3), (3, 5), (5, 6)]):
        assert_within_summation_order(out[begin:end], rows[begin:end], gate_up.expert(expert))


def test_a_cut_inside_blocks_is_refused_with_the_sizes_that_work(tmp_path):
    """12 heads of 32: wq_b has 384 rows, and TP2's 192-row halves cut its second block."""
    assert _cuts_exactly(128, 128, 2) and _cuts_exactly(256, 128, 2) and _cuts_exactly(32, 128, 2)
    assert not _cuts_exactly(192, 128, 2) and _cuts_exactly(384, 128, 3)
    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", layers=1, num_attention_heads=12,
                                    quantization=VARIANTS["fp8-experts-ue8m0"])
    with pytest.raises(ModelFolderError, match=r"split 2 ways cuts inside its 128-wide blocks .*: \[1, 3, 6, 12, "):
        kept_projection(folder, "layers.0.attn.wq_b.weight", 192, 32, shard_dim=0, rank=1, world_size=2)
    assert kept_projection(folder, "layers.0.attn.wq_b.weight", 128, 32, shard_dim=0, rank=2,
                           world_size=3).quantized.out_features == 128
