"""DeepSeek-V4 folders in DeepSeek's released layout (FP8 linears in 128x128 blocks, FP8 or FP4
routed experts, `X.scale` tensors, an `mtp.0.*` layer) against transformers loading the same
folder with `FineGrainedFP8Config(dequantize=True)`: its full forward is the reference (float32,
1e-4 on logits, as for bf16 / float32 folders in test_deepseek_v4.py).

Dequantizing is the computation itself, so a folder holding the dequantized weights in float32
(made here with transformers' own dequantizer) must give bit-equal logits, in float32 and in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV4ForCausalLM as ReferenceModel
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from model_folder.deepseek_v4_quantization import BlockQuantization
from model_folder.errors import ModelFolderError
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.make_model import add_make_model_arguments, run_make_model

ATOL = 1e-4
VARIANTS = {"fp8-experts-ue8m0": BlockQuantization(scale_format="ue8m0", expert_format="fp8"),
            "fp4-experts-float": BlockQuantization(scale_format="float", expert_format="fp4")}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=list(VARIANTS))
def released(request, tmp_path_factory) -> Path:
    return make_deepseek_v4_model(tmp_path_factory.mktemp(request.param), "deepseek-v4-tiny", seed=5,
                                  quantization=VARIANTS[request.param])


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as file:
        return {name: file.get_tensor(name) for name in file.keys()}


def write_folder(source: Path, out: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """A copy of `source` (tokenizer files too) with other tensors and config.json."""
    out.mkdir()
    for path in source.iterdir():
        if path.suffix == ".json":
            (out / path.name).write_text(path.read_text())
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "model.safetensors"))
    return out


def dequantized_copy(folder: Path, out: Path) -> Path:
    """The folder with every scaled weight dequantized to float32 by transformers, no scales, no
    quantization_config: an ordinary float32 folder."""
    tensors, dequantizer = read_all(folder), Fp8Dequantize(None)
    plain = {name: dequantizer._dequantize_one(tensor, tensors[name[:-len("weight")] + "scale"], torch.float32)
             if name[:-len("weight")] + "scale" in tensors else tensor
             for name, tensor in tensors.items() if not name.endswith(".scale")}
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"], config["expert_dtype"]
    return write_folder(folder, out, plain, config)


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (length,), generator=torch.Generator().manual_seed(seed))


def logits_of(model: DeepseekV4ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return model.compute_logits(model(ids, model.new_state()))


def test_logits_equal_transformers_loading_the_folder_dequantized(released):
    dequantized = FineGrainedFP8Config(dequantize=True)
    reference, info = ReferenceModel.from_pretrained(released, quantization_config=dequantized, dtype=torch.float32,
                                                     output_loading_info=True)
    assert not any(info.values())  # every tensor loaded; mtp.* ignored, as transformers declares
    ids = prompt(160)
    with torch.no_grad():
        expected = reference.eval()(ids[None], use_cache=False).logits[0]
    ours = DeepseekV4ForCausalLM.from_folder(released, dtype=torch.float32)
    torch.testing.assert_close(logits_of(ours, ids), expected, atol=ATOL, rtol=0)
    assert expected.argmax(-1).unique().numel() > 60  # a model that says many different things


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_equal_to_a_folder_of_the_dequantized_weights(released, tmp_path, dtype):
    plain = dequantized_copy(released, tmp_path / "dequantized")
    ids = prompt(100, seed=1)
    quantized_logits = logits_of(DeepseekV4ForCausalLM.from_folder(released, dtype=dtype), ids)
    assert torch.equal(quantized_logits, logits_of(DeepseekV4ForCausalLM.from_folder(plain, dtype=dtype), ids))


def test_the_folder_is_the_released_layout(released):
    config = json.loads((released / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(str(released / "model.safetensors"), "pt") as file:
        dtypes = {name: file.get_slice(name).get_dtype() for name in file.keys()}
    assert dtypes["layers.1.attn.wq_b.weight"] == "F8_E4M3" and dtypes["embed.weight"] == "F32"
    assert dtypes["layers.1.attn.compressor.wkv.weight"] == "F32" and "layers.1.attn.compressor.wkv.scale" not in dtypes
    expert = "I8" if config["expert_dtype"] == "fp4" else "F8_E4M3"
    assert dtypes["layers.1.ffn.experts.3.w2.weight"] == expert
    one_byte = expert == "I8" or config["quantization_config"]["scale_fmt"] == "ue8m0"
    assert dtypes["layers.1.ffn.experts.3.w2.scale"] == ("F8_E8M0" if one_byte else "F32")
    assert dtypes["mtp.0.e_proj.weight"] == "F8_E4M3" and "mtp.0.attn.wq_a.scale" in dtypes


# --- bad folders: one clear line -----------------------------------------------------------------


def edited_copy(released: Path, out: Path, edit) -> Path:
    tensors = read_all(released)
    edit(tensors)
    return write_folder(released, out, tensors, json.loads((released / "config.json").read_text()))


def wrong_grid(tensors):
    tensors["layers.2.attn.wq_a.scale"] = torch.cat([tensors["layers.2.attn.wq_a.scale"]] * 2)


def missing_scale(tensors):
    del tensors["layers.0.attn.wo_b.scale"]


def fp8_expert_among_fp4(tensors):
    weight = tensors["layers.1.ffn.experts.2.w1.weight"]
    if weight.dtype == torch.int8:  # an fp4 folder: store this expert as FP8 instead
        tensors["layers.1.ffn.experts.2.w1.weight"] = torch.zeros(weight.shape[0], 2 * weight.shape[1],
                                                                  dtype=torch.float8_e4m3fn)
    else:
        tensors["layers.1.ffn.experts.2.w1.weight"] = weight.view(torch.int8)


@pytest.mark.parametrize("edit, message", [
    (wrong_grid, r"tensor 'layers.2.attn.wq_a.scale' has shape \(2, 1\), but 'layers.2.attn.wq_a.weight' "
                 r"\(32 x 64 values in 128 x 128 blocks\) needs a scale grid of \(1, 1\)"),
    (missing_scale, r"tensor 'layers.0.attn.wo_b.weight' is stored as F8_E4M3 but has no scale tensor"),
    (fp8_expert_among_fp4, r"tensor 'layers.1.ffn.experts.2.w1.weight' is stored as torch\.\w+, but as a routed "
                           r"expert with expert_dtype '\w+' it must be"),
])  # fmt: skip
def test_bad_tensors_are_named_in_one_line(released, tmp_path, edit, message):
    folder = edited_copy(released, tmp_path / "bad", edit)
    with pytest.raises(ModelFolderError, match=message) as raised:
        DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "awq"}, r"quantization_config.quant_method 'awq' is not supported \(supported: 'fp8'"),
    ({"scale_fmt": "e4m3"}, r"quantization_config.scale_fmt 'e4m3' is not supported"),
    ({"group_size": 64}, r"quantization_config.group_size is not supported"),
])  # fmt: skip
def test_a_bad_quantization_config_is_refused_at_load(released, tmp_path, change, message):
    config = json.loads((released / "config.json").read_text())
    config["quantization_config"].update(change)
    folder = write_folder(released, tmp_path / "bad", read_all(released), config)
    with pytest.raises(ModelFolderError, match=message):
        DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)


def test_scales_without_a_quantization_config_are_refused(released, tmp_path):
    config = json.loads((released / "config.json").read_text())
    del config["quantization_config"], config["expert_dtype"]
    folder = write_folder(released, tmp_path / "bad", read_all(released), config)
    with pytest.raises(ModelFolderError, match=r"has no scale tensor \(expected '\S+.scale' and a quantization_config"):
        DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)


# --- the command line ----------------------------------------------------------------------------------


def make_model_cli(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_make_model_arguments(parser)
    return run_make_model(parser.parse_args(list(argv)))


def test_make_model_flags_write_the_format(tmp_path, capsys):
    folder = make_model_cli(str(tmp_path / "q"), "--preset", "deepseek-v4-tiny", "--quantize", "fp8",
                            "--expert-dtype", "fp4", "--scale-format", "float")
    assert "FP8 with fp4 experts" in capsys.readouterr().out
    config = json.loads((folder / "config.json").read_text())
    assert config["expert_dtype"] == "fp4" and config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "scale_fmt": "float"}


@pytest.mark.parametrize("argv, message", [
    (["--preset", "deepseek-v4-tiny", "--expert-dtype", "fp4"], "need --quantize fp8"),
    (["--preset", "deepseek-v4-tiny", "--quantize", "int4"], "--quantize 'int4' is not supported; choose one of fp8"),
    (["--preset", "deepseek-v4-tiny", "--quantize", "fp8", "--scale-format", "e5m2"], "--scale-format 'e5m2'"),
    (["--preset", "tiny", "--quantize", "fp8"], "apply to the DeepSeek-V4 presets only"),
])  # fmt: skip
def test_make_model_refuses_bad_flags(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        make_model_cli(str(tmp_path / "m"), *argv)


def test_ue8m0_scales_as_raw_bytes_load_alike(released, tmp_path):
    """ue8m0 scales stored as their bytes (U8, as MXFP8 checkpoints do) give the same model."""
    def as_bytes(tensors):
        for name, tensor in tensors.items():
            if tensor.dtype == torch.float8_e8m0fnu:
                tensors[name] = tensor.view(torch.uint8)

    folder = edited_copy(released, tmp_path / "bytes", as_bytes)
    with safe_open(str(folder / "model.safetensors"), "pt") as file:
        assert "U8" in {file.get_slice(name).get_dtype() for name in file.keys()}
    ids = prompt(40, seed=2)
    expected = logits_of(DeepseekV4ForCausalLM.from_folder(released, dtype=torch.float32), ids)
    assert torch.equal(logits_of(DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32), ids), expected)


def test_fp4_stored_as_f4_is_refused_in_one_line(released, tmp_path):
    """safetensors 0.8 writes float4_e2m1fn_x2 as F4 but cannot read its own file back."""
    if json.loads((released / "config.json").read_text())["expert_dtype"] != "fp4":
        pytest.skip("an FP4-expert folder")

    def as_f4(tensors):
        name = "layers.3.ffn.experts.0.w3.weight"
        tensors[name] = tensors[name].view(torch.float4_e2m1fn_x2)

    folder = edited_copy(released, tmp_path / "f4", as_f4)
    with pytest.raises(ModelFolderError, match="'layers.3.ffn.experts.0.w3.weight' is stored as F4"):
        DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
