"""The threshold top-k's kernels (threshold_top_k._chosen_columns, the row pass, and _kth_largest,
the radix select) compile for Hopper (sm_90) on any machine, within an SM's shared memory and
without spilling registers: the interpreter the other tests use accepts code the compiler rejects
(sm90_compile.py)."""

from __future__ import annotations

import pytest
from sm90_compile import compile_for_sm90, ptxas_usage, run_in_fresh_interpreter

pytest.importorskip("triton")

NAMES = ["scores_ptr", "kth_ptr", "wanted_ptr", "out_ptr", "entries", "stride_row", "stride_out"]
TYPES = ["*fp32", "*fp32", "*i32", "*i64", "i32", "i32", "i32"]


RADIX_NAMES = ["scores_ptr", "kth_ptr", "wanted_ptr", "entries", "stride_row", "k"]
RADIX_TYPES = ["*fp32", "*fp32", "*i32", "i32", "i32", "i32"]


def compile_all() -> None:
    from model_shards.deepseek_v4.threshold_top_k import RADIX_TILE, ROW_TILE, _chosen_columns, _kth_largest

    for name, compiled in [
        ("chosen_columns", compile_for_sm90(_chosen_columns, NAMES, TYPES, {"TILE": ROW_TILE}, num_warps=8)),
        ("kth_largest", compile_for_sm90(_kth_largest, RADIX_NAMES, RADIX_TYPES, {"TILE": RADIX_TILE}, num_warps=8)),
    ]:
        usage = ptxas_usage(compiled)
        assert compiled.metadata.shared <= 228 * 1024 and usage["spill_bytes"] == 0, (name, usage)
        print(f"{name}: ok, shared {compiled.metadata.shared} bytes, {usage}")


@pytest.mark.slow
def test_the_row_pass_compiles_for_hopper():
    result = run_in_fresh_interpreter(__file__, timeout_s=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "chosen_columns: ok" in result.stdout and "kth_largest: ok" in result.stdout, result.stdout


if __name__ == "__main__":
    compile_all()
