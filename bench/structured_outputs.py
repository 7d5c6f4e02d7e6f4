"""What structured outputs cost a decode batch: time per decode step with 0, a quarter and all of
the rows under a JSON grammar (xgrammar masks filled on the CPU during the forward pass, applied
on the device), and the time a JSON schema takes to compile.

    python bench/structured_outputs.py                      # CUDA if present, else the CPU
    python bench/structured_outputs.py --preset small --batch 8 32 128 --steps 64

Prints a table and writes bench/results/structured_outputs.json. The model has random weights:
under `json_object` it wanders inside JSON strings, so every constrained row stays constrained
for the whole run (the mask is filled every step), which is the case to measure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_shards.make_model import make_model
from protocol.sampling_params import SamplingParams, StructuredOutput

RESULTS = Path(__file__).resolve().parent / "results" / "structured_outputs.json"
JSON_OBJECT = StructuredOutput("json_object")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
    "type": "string"}}, "score": {"type": "number"}}, "required": ["name", "tags", "score"]}  # fmt: skip


def decode_step_ms(engine: LLMEngine, batch: int, constrained: int, steps: int) -> float:
    """Mean wall time of a decode step of `batch` rows, `constrained` of them under a grammar."""
    params = [SamplingParams(max_tokens=steps + 1, ignore_eos=True,
                             structured_output=JSON_OBJECT if row < constrained else None)
              for row in range(batch)]  # fmt: skip
    prompts = [[1, 100 + row, 200 + row, 300 + row] for row in range(batch)]
    start, first_step_done = None, 0

    def mark(_: list) -> None:  # after each step: start timing once every row has its first token
        nonlocal start, first_step_done
        first_step_done += 1
        if first_step_done == 2:
            start = time.perf_counter()

    generate(engine, prompts, params, on_progress=mark)
    return (time.perf_counter() - start) * 1000 / max(1, first_step_done - 2)


def compile_ms(engine: LLMEngine) -> float:
    """A fresh schema's compile, seen as the extra time of its first request."""
    schema = StructuredOutput("json_schema", json.dumps({**SCHEMA, "title": str(time.time())}))
    start = time.perf_counter()
    generate(engine, [[1, 2, 3]], SamplingParams(max_tokens=1, structured_output=schema))
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        model_dir = str(make_model(Path(folder) / args.preset, args.preset))
        engine = LLMEngine(LongctxConfig(
            model=ModelSettings(path=model_dir, device=device),
            cache=CacheSettings(block_size=64, num_device_blocks=4 * max(args.batch) + 64),
            scheduler=SchedulerSettings(max_num_seqs=max(args.batch), max_tokens_per_step=8192),
        ))  # fmt: skip
        compile_ms(engine)  # imports xgrammar, builds the vocabulary's tables once
        rows = [_row(engine, batch, args.steps) for batch in args.batch]
        compile_time = compile_ms(engine)
        engine.shutdown()
    _report(rows, compile_time, device, args.preset)


def _row(engine: LLMEngine, batch: int, steps: int) -> dict:
    times = {share: decode_step_ms(engine, batch, int(batch * share), steps) for share in (0.0, 0.25, 1.0)}
    return {"batch": batch, "step_ms_free": times[0.0], "step_ms_quarter": times[0.25], "step_ms_all": times[1.0],
            "overhead_all_percent": 100 * (times[1.0] / times[0.0] - 1)}  # fmt: skip


def _report(rows: list[dict], compile_time: float, device: str, preset: str) -> None:
    print(f"decode step with JSON grammars, {preset} model on {device}")
    print(f"{'batch':>6} {'free ms':>9} {'1/4 ms':>9} {'all ms':>9} {'overhead':>9}")
    for row in rows:
        print(f"{row['batch']:>6} {row['step_ms_free']:>9.2f} {row['step_ms_quarter']:>9.2f} "
              f"{row['step_ms_all']:>9.2f} {row['overhead_all_percent']:>8.1f}%")  # fmt: skip
    print(f"compile of a fresh 3-field schema, seen by its request: {compile_time:.1f} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": device, "preset": preset, "rows": rows,
                                   "first_request_with_new_schema_ms": compile_time}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
