"""Tokenizing a long text prompt: one `encode` call against exact parallel chunks
(model_folder/chunked_encoding.py), on this machine's cores.

The text is a document like the make-model tokenizer's corpus: paragraphs of pseudo-words
(Zipf-distributed, wrapped at 80 columns), numbers, now and then an indented code block. Columns:
`plain` is `Tokenizer.encode` as served before (one call, one thread, character offsets computed);
`one call, no offsets` is `encode_batch_fast([text])` (one thread, no offsets), which shows how
much of the speed-up is the offsets and how much the cores; `chunked` is the chunked encoder
with an empty chunk cache (its one-time eligibility check timed apart); `re-asked` the same
document with a new question after it, its chunks' ids in the cache (what a re-asked, cached
document costs). Each is the best of --repeats, after a warm-up that
fills the BPE model's word cache; chunked ids are checked equal to the plain ones.

    python bench/tokenize_long.py                                 # ~1M tokens, 32K-id tokenizer
    python bench/tokenize_long.py --tokens 20000 --vocab 1024     # a quick check

Prints a table and writes --out (default $OUT/tokenize_long.json if OUT is set, else
bench/results/tokenize_long.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_folder.chunk_ids_cache import ChunkIdsCache  # noqa: E402
from model_folder.chunked_encoding import ChunkedEncoder, chunk_bounds  # noqa: E402
from model_folder.tokenizer_training import MAX_TOKENIZER_VOCAB, trained_tokenizer_json  # noqa: E402

SAMPLE_CHARS = 200_000  # to estimate characters per token before building the whole text
QUESTION = "\nQuestion: which clauses above name a payment date, and what are the dates?"
CODE_BLOCK = "    for index, value in enumerate(values):\n        total += value * {n}\n    return total\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1_000_000], help="about this many tokens a text")
    parser.add_argument("--vocab", type=int, default=MAX_TOKENIZER_VOCAB,
                        help="make-model tokenizer size (the 8B preset's tokenizer is the 32768 maximum)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    default_out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results") / "tokenize_long.json"
    parser.add_argument("--out", type=Path, default=default_out)
    return parser.parse_args()


def document(num_chars: int, seed: int) -> str:
    """Paragraphs of pseudo-words wrapped at 80 columns, numbers, and a code block now and then."""
    rng = random.Random(seed)
    lexicon = [pseudo_word(rng) for _ in range(20_000)]
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    paragraphs, length = [], 0
    while length < num_chars:
        paragraph = CODE_BLOCK.format(n=rng.randint(0, 999)) if rng.random() < 0.05 else prose(rng, lexicon, weights)
        paragraphs.append(paragraph)
        length += len(paragraph) + 1
    return "\n".join(paragraphs)[:num_chars]


def prose(rng: random.Random, lexicon: list[str], weights: list[float]) -> str:
    sentences = []
    for _ in range(rng.randint(2, 8)):
        words = rng.choices(lexicon, weights, k=rng.randint(5, 20))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 100_000)))
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ";"]))
    return wrapped(" ".join(sentences), 80)


def wrapped(text: str, columns: int) -> str:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > columns:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line]) + "\n"


def pseudo_word(rng: random.Random) -> str:
    syllables = ("ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "bra", "chen", "dor", "fel", "gis", "han", "jup")
    return "".join(rng.choices(syllables, k=rng.randint(1, 4)))


def best_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(backend: tokenizers.Tokenizer, text: str, repeats: int) -> dict:
    encoder = ChunkedEncoder(backend, min_text_chars=0)  # chunk whatever the size
    start = time.perf_counter()
    reason = encoder.ineligible_reason
    eligibility_s = time.perf_counter() - start
    if reason is not None:
        raise SystemExit(f"the tokenizer is not eligible: {reason}")
    plain_ids = backend.encode(text).ids  # the warm-up: fills the BPE word cache for every method
    asked = text + QUESTION
    if encoder.encode(text) != plain_ids or encoder.encode(asked) != backend.encode(asked).ids:
        raise SystemExit("chunked ids differ from the plain ones")
    plain = best_seconds(lambda: backend.encode(text).ids, repeats)
    no_offsets = best_seconds(lambda: backend.encode_batch_fast([text])[0].ids, repeats)
    chunked = best_seconds(lambda: cold(encoder).encode(text), repeats)
    encoder.encode(text)  # the document's chunks in the cache
    reasked = best_seconds(lambda: encoder.encode(asked), repeats)
    return {"chars": len(text), "tokens": len(plain_ids), "plain_s": round(plain, 4),
            "one_call_no_offsets_s": round(no_offsets, 4), "chunked_s": round(chunked, 4),
            "reasked_s": round(reasked, 4), "speed_up": round(plain / chunked, 2),
            "reasked_speed_up": round(plain / reasked, 1), "chunks": len(chunk_bounds(text)) - 1,
            "eligibility_check_s": round(eligibility_s, 4), "exact": True}  # fmt: skip


def cold(encoder: ChunkedEncoder) -> ChunkedEncoder:
    """The encoder with its chunk cache emptied: every chunk encoded."""
    encoder.cache = ChunkIdsCache(encoder.cache.max_tokens)
    return encoder


def print_table(rows: list[dict], cores: int) -> None:
    print(f"{'chars':>10} {'tokens':>9} {'plain s':>8} {'1 call, no offsets s':>21} {'chunked s':>10} "
          f"{'speed-up':>8} {'re-asked s':>10} {'speed-up':>8} {'chunks':>6} {'cores':>5}")
    for row in rows:
        print(f"{row['chars']:>10} {row['tokens']:>9} {row['plain_s']:>8.3f} {row['one_call_no_offsets_s']:>21.3f} "
              f"{row['chunked_s']:>10.3f} {row['speed_up']:>7.2f}x {row['reasked_s']:>10.4f} "
              f"{row['reasked_speed_up']:>7.1f}x {row['chunks']:>6} {cores:>5}")


def main() -> None:
    args = parse_args()
    backend = tokenizers.Tokenizer.from_str(trained_tokenizer_json(args.vocab))
    sample = document(SAMPLE_CHARS, args.seed)
    chars_per_token = len(sample) / len(backend.encode(sample, add_special_tokens=False).ids)
    rows = [measure(backend, document(int(tokens * chars_per_token), args.seed), args.repeats)
            for tokens in args.tokens]  # fmt: skip
    cores = os.cpu_count() or 1
    print_table(rows, cores)
    report = {"cores": cores, "vocab": backend.get_vocab_size(),
              "tokenizers": tokenizers.__version__, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
