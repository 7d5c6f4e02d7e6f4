"""The paged decode kernels compile for Hopper (sm_90) on any machine: Triton's compiler and its
bundled ptxas run without a GPU. CPU tests otherwise run the kernels only in the interpreter,
which accepts code the compiler rejects; this catches that before a GPU does.

The compile runs in a fresh interpreter (TRITON_INTERPRET=0): this test process has the
interpreter on, and Triton reads that choice once, when a kernel is defined.
"""

from __future__ import annotations

import pytest
from sm90_compile import compile_for_sm90, run_in_fresh_interpreter

pytest.importorskip("triton")

PARTIAL_ARGS = ["query_ptr", "cache_ptr", "block_table_ptr", "seq_lens_ptr", "partial_out_ptr", "partial_lse_ptr",
                "scale_log2", "num_seqs", "split_slots", "max_splits", "min_split_tiles", "head_dim", "stride_query_seq",
                "stride_query_head", "stride_cache_block", "stride_cache_kv", "stride_cache_token",
                "stride_cache_head", "stride_table_seq"]
PARTIAL_TYPES = ["*bf16", "*bf16", "*i32", "*i32", "*fp32", "*fp32", "fp32"] + ["i32"] * 12
MERGE_ARGS = ["partial_out_ptr", "partial_lse_ptr", "seq_lens_ptr", "out_ptr", "split_slots", "max_splits",
              "min_split_tiles", "head_dim", "stride_out_seq", "stride_out_head"]
MERGE_TYPES = ["*fp32", "*fp32", "*i32", "*bf16"] + ["i32"] * 6


def _compile(kernel, names: list[str], types: list[str], constexprs: dict, **options) -> int:
    """Compile `kernel` for sm_90; returns its shared memory bytes."""
    return compile_for_sm90(kernel, names, types, constexprs, **options).metadata.shared


def compile_all() -> None:
    from model_shards.attention import triton_paged_decode as decode

    plan = decode.DEFAULT_PLAN
    for block_size in (16, 64, 256):  # several blocks a tile, one, part of one
        constexprs = {"GROUP": 4, "BLOCK_HEADS": 16, "HEAD_DIM": 128, "BLOCK_SIZE": block_size,
                      "TILE": plan.tile_tokens, "UPCAST": False, "SEQ_CHUNK": decode._SEQ_CHUNK}
        shared = _compile(decode._paged_decode_partials, PARTIAL_ARGS, PARTIAL_TYPES, constexprs,
                          num_warps=plan.num_warps, num_stages=plan.num_stages)
        print(f"partials block {block_size}: {shared} bytes of shared memory")
    _compile(decode._merge_partials, MERGE_ARGS, MERGE_TYPES, {"HEAD_DIM": 128, "TILE": plan.tile_tokens, "CHUNK": 16},
             num_warps=4)
    print("merge: ok")


@pytest.mark.slow
def test_decode_kernels_compile_for_hopper():
    result = run_in_fresh_interpreter(__file__, timeout_s=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The K/V loads are software-pipelined: their stages sit in shared memory (0 if not).
    assert all(int(line.split(": ")[1].split()[0]) > 0 for line in result.stdout.splitlines()
               if line.startswith("partials"))
    assert "merge: ok" in result.stdout


if __name__ == "__main__":
    compile_all()
