"""DeepSeek-V4's mHC kernels (model_shards/deepseek_v4/hyper_kernels.py) compile for Hopper (sm_90)
on any machine, in every stream_mixes tiling bench/deepseek_v4_mhc.py compares (one split or
several with the finishing sum, float32 FMAs or tf32x3 tensor-core products) and for V4-Flash's
hc of 4 and the tiny preset's 2: the layers run these kernels on every GPU forward, and the
interpreter the other tests use accepts code the compiler rejects."""

from __future__ import annotations

import pytest
from sm90_compile import compile_for_sm90, run_in_fresh_interpreter

pytest.importorskip("triton")

MIXES_ARGS = ["x_ptr", "fn_ptr", "out_ptr", "squares_ptr", "tokens", "width", "outputs", "split_width", "eps",
              "stride_x", "stride_fn", "stride_out"]
MIXES_TYPES = ["*bf16", "*fp32", "*fp32", "*fp32", "i32", "i32", "i32", "i32", "fp32", "i32", "i32", "i32"]
FINISH_ARGS = ["part_ptr", "squares_ptr", "out_ptr", "tokens", "width", "outputs", "eps", "stride_out"]
WEIGHTS_ARGS = ["mix_ptr", "base_ptr", "scale_ptr", "pre_ptr", "post_ptr", "comb_ptr", "tokens", "stride_mix",
                "hc_eps", "iterations"]
COLLAPSE_ARGS = ["weight_ptr", "x_ptr", "out_ptr", "hidden"]
MIX_ARGS = ["x_ptr", "y_ptr", "post_ptr", "comb_ptr", "out_ptr", "hidden"]


def compile_all() -> None:
    from model_shards.deepseek_v4 import hyper_kernels as kernels
    from model_shards.deepseek_v4.hyper_kernels import BLOCK_COLUMNS, BLOCK_HIDDEN, MixesTiling

    tilings = [MixesTiling(), MixesTiling(rows=64, splits=4, warps=8),
               MixesTiling(precision="tf32x3"), kernels.DEFAULT_MIXES_TILING]
    for tiling in tilings:
        constexprs = {"BT": tiling.rows, "BK": BLOCK_COLUMNS, "BN": 32, "SPLIT": tiling.splits,
                      "PRECISION": tiling.precision}
        compile_for_sm90(kernels._stream_mixes, MIXES_ARGS, MIXES_TYPES, constexprs, num_warps=tiling.warps)
        print(f"stream_mixes {tiling}: ok")
    compile_for_sm90(kernels._finish_split_mixes, FINISH_ARGS, ["*fp32"] * 3 + ["i32"] * 3 + ["fp32", "i32"],
                     {"SPLIT": 4, "BT": 64, "BN": 32}, num_warps=4)
    print("finish_split_mixes: ok")
    for hc in (4, 2):
        compile_for_sm90(kernels._hyper_weights, WEIGHTS_ARGS, ["*fp32"] * 6 + ["i32", "i32", "fp32", "i32"],
                         {"S": hc, "BT": 64}, num_warps=4)
        compile_for_sm90(kernels._collapse, COLLAPSE_ARGS, ["*fp32", "*bf16", "*bf16", "i32"],
                         {"S": hc, "BD": BLOCK_HIDDEN}, num_warps=4)
        compile_for_sm90(kernels._mix, MIX_ARGS, ["*bf16", "*bf16", "*fp32", "*fp32", "*bf16", "i32"],
                         {"S": hc, "BD": BLOCK_HIDDEN}, num_warps=4)
        print(f"hyper_weights, collapse, mix at hc {hc}: ok")


@pytest.mark.slow
def test_mhc_kernels_compile_for_hopper():
    result = run_in_fresh_interpreter(__file__, timeout_s=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("stream_mixes MixesTiling") == 4, result.stdout
    assert "finish_split_mixes: ok" in result.stdout and result.stdout.count("hyper_weights, collapse, mix") == 2


if __name__ == "__main__":
    compile_all()
