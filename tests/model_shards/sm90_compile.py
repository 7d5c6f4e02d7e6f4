"""Compiling a Triton kernel for Hopper (sm_90) without a GPU: Triton's compiler and its bundled
ptxas run anywhere. The CPU tests otherwise run kernels in the interpreter, which accepts code the
compiler rejects; the *_compile tests catch that before a GPU does. Run in a fresh interpreter
with TRITON_INTERPRET=0 (Triton reads that choice once, when a kernel is defined):
`run_in_fresh_interpreter(__file__)` from the test, `compile_all()` in its `__main__`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def compile_for_sm90(kernel, names: list[str], types: list[str], constexprs: dict, **options):
    """`kernel` compiled for sm_90 (`.metadata.shared`, `.asm["ptx"]`); `names` / `types` its
    runtime arguments, `constexprs` its compile-time ones, `options` num_warps and the like."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(zip(names, types)) | {name: "constexpr" for name in constexprs}
    fixed = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=fixed),
                          target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_usage(compiled) -> dict[str, int]:
    """Registers a thread and bytes spilled to local memory, as the bundled ptxas reports them
    for a compiled kernel's PTX (`ptxas -v`): a kernel that spills runs its loop through memory."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        result = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    report = result.stderr + result.stdout
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))}


def run_in_fresh_interpreter(script: str, timeout_s: float) -> subprocess.CompletedProcess:
    """`python3 script` with the interpreter off and the repo importable; its output captured."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
