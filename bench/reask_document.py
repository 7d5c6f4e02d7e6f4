"""A long text document asked about, then asked about again: time to first token split into the
request's preparation (tokenizing, range checks, block hashes) and the engine's part.

Why: a customer feeds a contract set or a book once and asks several questions. The second ask
finds the document's KV in the prefix cache, so its prefill is the question alone; what is left
is the text's tokenizing, ~1.5-2.5 s per million tokens in one `encode` call, which was the whole
TTFT of a re-asked 1M-token document. Since session 21 the tokenizer cuts long texts where its
output is provably cut too, encodes the chunks on all cores and keeps their ids
(model_folder/chunked_encoding.py, chunk_ids_cache.py). Rows per document length:

- `first ask`: a fresh engine's first request (tokenizing on all cores, the whole prefill);
- `re-ask`: the same document, a new question after it (chunk ids cached, prefix cache hit);
- `re-ask, one encode call`: the same, tokenized as before session 21 (`backend.encode`, one
  thread), the engine's part measured again (its prefix hit too).

    python bench/reask_document.py                      # CPU smoke: tiny model, 20K tokens
    python bench/reask_document.py --preset llama3-8b-shape --layers 2 --tokens 262144 1000000   # GPU

Prints a table and writes --out ($OUT/reask_document.json, else bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tokenize_long import document  # noqa: E402

QUESTIONS = ("\nQuestion: which clauses above name a payment date?",
             "\nQuestion: who are the parties, and where do they sign?")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--tokens", type=int, nargs="+", default=[20_000], help="about this many document tokens")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    default_out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results") / "reask_document.json"
    parser.add_argument("--out", type=Path, default=default_out)
    return parser.parse_args()


def make_engine(args, model_dir: str, max_model_len: int):
    import torch

    from cluster.config import CacheSettings, LongctxConfig, ModelSettings
    from engine.llm_engine import LLMEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return LLMEngine(LongctxConfig(model=ModelSettings(path=model_dir, device=device, dtype=dtype,
                                                       max_model_len=max_model_len),
                                   cache=CacheSettings(block_size=args.block_size)))  # fmt: skip


def document_of(tokenizer, num_tokens: int, seed: int) -> str:
    """A pseudo-word document of about `num_tokens` tokens for this tokenizer."""
    sample = document(100_000, seed)
    chars_per_token = len(sample) / len(tokenizer.backend.encode(sample, add_special_tokens=False).ids)
    return document(int(num_tokens * chars_per_token), seed)


def ask(engine, request_id: str, prompt: str) -> dict:
    """One request to its first token: (prepare s, engine s, prompt tokens, prefix-hit tokens)."""
    from protocol.sampling_params import SamplingParams

    started = time.perf_counter()
    prepared = engine.prepare_request(request_id, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    prepared_at = time.perf_counter()
    engine.add_prepared(prepared)
    first = None
    while first is None and engine.has_unfinished_requests():
        first = next((delta for delta in engine.step() if delta.request_id == request_id), None)
    while engine.has_unfinished_requests():  # the request's last (overlapped) work
        engine.step()
    done = time.perf_counter()
    return {"prepare_s": prepared_at - started, "engine_s": done - prepared_at, "ttft_s": done - started,
            "prompt_tokens": first.num_prompt_tokens, "prefix_hit_tokens": first.num_prefix_hit_tokens}


def one_encode_call(tokenizer):
    """The tokenizer's encode as before session 21: one `encode` call, one thread, offsets made."""
    return lambda text, add_special_tokens=True: tokenizer.backend.encode(
        text, add_special_tokens=add_special_tokens).ids


def measure(engine, num_tokens: int) -> list[dict]:
    text = document_of(engine.tokenizer, num_tokens, seed=num_tokens)  # no length starts like another
    rows = [{"ask": "first ask", **ask(engine, f"first-{num_tokens}", text + QUESTIONS[0])},
            {"ask": "re-ask", **ask(engine, f"again-{num_tokens}", text + QUESTIONS[1])}]
    chunked_encode = engine.tokenizer.encode
    engine.tokenizer.encode = one_encode_call(engine.tokenizer)  # the instance's own attribute, for this row
    try:
        rows.append({"ask": "re-ask, one encode call",
                     **ask(engine, f"plain-{num_tokens}", text + QUESTIONS[1] + " Briefly.")})
    finally:
        engine.tokenizer.encode = chunked_encode
    return [{"document_tokens": num_tokens, **row} for row in rows]


def print_table(rows: list[dict]) -> None:
    print(f"{'document':>9} {'ask':<24} {'prompt':>8} {'hit':>8} {'prepare s':>10} {'engine s':>9} {'TTFT s':>8}")
    for row in rows:
        print(f"{row['document_tokens']:>9} {row['ask']:<24} {row['prompt_tokens']:>8} {row['prefix_hit_tokens']:>8} "
              f"{row['prepare_s']:>10.3f} {row['engine_s']:>9.3f} {row['ttft_s']:>8.3f}")


def main() -> None:
    args = parse_args()
    from model_shards.make_model import make_model

    # The documents' lengths are estimates from a sample (+-1%): room for them and the questions.
    max_model_len = int(max(args.tokens) * 1.05) + 1024
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        overrides = {"num_hidden_layers": args.layers} if args.layers else {}
        model_dir = str(make_model(folder, args.preset, max_position_embeddings=max_model_len, **overrides))
        engine = make_engine(args, model_dir, max_model_len)
        try:
            for num_tokens in args.tokens:
                rows += measure(engine, num_tokens)
                print_table(rows[-3:])  # as they come: a later length may not finish in a device call
        finally:
            engine.shutdown()
    print("all lengths:")
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "layers": args.layers, "cores": os.cpu_count(),
                                    "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
