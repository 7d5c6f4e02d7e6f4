"""The quantized-weight matmul kernels (model_shards/deepseek_v4/quantized_matmul_kernel.py) compile
for Hopper (sm_90) on any machine, as tests/model_shards/test_triton_compile.py does for the
paged decode kernels: the interpreter accepts code the compiler rejects (float8 loads, joins and
reshapes of the FP4 unpacking, a constexpr-shaped accumulator), so this catches it before a GPU does.

Every format x scale kind x operand order, decode and prefill tiles, the grouped kernel and the
dequantize kernel; the run prints each kernel's shared memory and whether its dots became wgmma.
(Triton 3.9 here did not software-pipeline even a plain bf16 matmul's loads in this offline compile,
so nothing is asserted about pipelining: the GPU's Triton decides that at run time.)
"""

from __future__ import annotations

import pytest
from sm90_compile import compile_for_sm90, run_in_fresh_interpreter

pytest.importorskip("triton")

MATMUL_ARGS = ["x_ptr", "w_ptr", "scale_ptr", "out_ptr", "M", "N", "K", "k_per_split", "stride_x", "stride_w",
               "stride_scale", "stride_out_split", "stride_out"]
GROUPED_ARGS = ["x_ptr", "w_ptr", "scale_ptr", "out_ptr", "slot_expert_ptr", "slot_row_ptr", "offsets_ptr", "experts",
                "N", "K", "stride_x", "stride_w_expert", "stride_w", "stride_scale_expert", "stride_scale",
                "stride_out"]
DEQUANTIZE_ARGS = ["w_ptr", "scale_ptr", "out_ptr", "N", "K", "stride_w", "stride_scale", "stride_out"]
FORMATS = {"fp8 ue8m0": (0, True, "*fp8e4nv", "*u8"), "fp8 float32": (0, False, "*fp8e4nv", "*fp32"),
           "fp4": (1, True, "*u8", "*u8")}
TILES = {"decode": dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=4),
         "prefill": dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4)}


def _compile(kernel, names: list[str], types: list[str], constexprs: dict, **options):
    """Compile `kernel` for sm_90; returns (shared memory bytes, whether the PTX has wgmma)."""
    compiled = compile_for_sm90(kernel, names, types, constexprs, **options)
    return compiled.metadata.shared, "wgmma" in compiled.asm["ptx"]


def compile_all() -> None:
    from model_shards.deepseek_v4 import quantized_matmul_kernel as kernels

    for fmt_name, (fmt, ue8m0, weight_type, scale_type) in FORMATS.items():
        for tile_name, tile in TILES.items():
            for left in (False, True):
                shape = {key: tile[key] for key in ("BM", "BN", "BK")}
                options = {key: tile[key] for key in ("num_warps", "num_stages")}
                common = dict(FORMAT=fmt, SCALE_UE8M0=ue8m0, **shape, WEIGHT_LEFT=left)
                out_type = "*fp32" if tile_name == "decode" else "*bf16"  # split-K partials
                shared, wgmma = _compile(kernels._quantized_matmul, MATMUL_ARGS,
                                         ["*bf16", weight_type, scale_type, out_type] + ["i32"] * 9,
                                         common | {"GROUP_M": 8}, **options)
                print(f"matmul {fmt_name} {tile_name} weight_left={left}: {shared} bytes shared, wgmma {wgmma}")
                shared, wgmma = _compile(kernels._grouped_quantized_matmul, GROUPED_ARGS,
                                         ["*bf16", weight_type, scale_type, "*bf16", "*i32", "*i32", "*i32"] + ["i32"] * 9,
                                         common, **options)
                print(f"grouped {fmt_name} {tile_name} weight_left={left}: {shared} bytes shared, wgmma {wgmma}")
        _compile(kernels._dequantize, DEQUANTIZE_ARGS, [weight_type, scale_type, "*bf16"] + ["i32"] * 5,
                 dict(FORMAT=fmt, SCALE_UE8M0=ue8m0, BN=64, BK=128), num_warps=4)
        print(f"dequantize {fmt_name}: ok")


@pytest.mark.slow
def test_quantized_matmul_kernels_compile_for_hopper():
    result = run_in_fresh_interpreter(__file__, timeout_s=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith(("matmul", "grouped")) for line in lines) == 2 * len(FORMATS) * len(TILES) * 2
    assert sum(line.startswith("dequantize") for line in lines) == len(FORMATS)
    # Hopper's warpgroup MMA wherever the tile allows it: every prefill tile, and decode tiles whose
    # 16 token rows are the dot's N (weight_left); 16-row tiles on the left fall back to mma.sync
    for line in lines:
        if line.startswith(("matmul", "grouped")):
            assert line.endswith("wgmma True") == ("prefill" in line or "weight_left=True" in line), line


if __name__ == "__main__":
    compile_all()
