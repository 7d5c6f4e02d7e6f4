"""The measurements of bench/vs_transformers.py: one request and a batch through longctx's engine
(its defaults) and through transformers' generate (sdpa), each returning a dict of plain numbers.

Times are wall clock as a caller sees them. TTFT: from the call to the first token on the host;
time per output token (TPOT): the rest of the request over its remaining tokens. transformers is
timed inside one `generate` by a stopping criterion that synchronizes and stamps every token, so
that a long prompt is prefilled once, not once for TTFT and again for the decode.

transformers' figures are its steady state: each is a `generate` at a shape (batch, prompt length,
output tokens) that the process ran just before, with other tokens; that first call is kept
apart under "first_call". On Hopper, torch (2.9 on, with cuDNN > 9.15) sends SDPA to cuDNN first
(`check_prefer_cudnn_attention` in aten/.../transformers/cuda/sdp_utils.cpp), and cuDNN builds an
execution plan for every new (batch, heads, queries, keys, strides) shape, ~50-80 ms of host time,
kept per thread for the process (`MHAGraphCache` in aten/.../cudnn/MHA.cpp). transformers' decode
attends over a key length one longer each step (DynamicLayer.update concatenates), so its first
call at a length builds a plan for the prefill and for every decode step: 50-80 ms a token, while
the same call again runs at ~3 ms a token. See `sdpa_choices` for what torch picks there.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch

from bench.gpu_model_cases import random_prompt

COMPARED_TOKENS = 8  # greedy tokens compared with transformers' (both sides report these)


def distinct_lengths(base: int, count: int) -> list[int]:
    """`count` prompt lengths near `base`, all different (so no two share an exact shape)."""
    return [base + 61 * i for i in range(count)]


# --- longctx -----------------------------------------------------------------------------------
def ours_generate(engine, prompts: list[list[int]], output_tokens: int) -> dict:
    """All prompts submitted together: TTFT per request, TPOT per request, output tok/s."""
    from engine.offline import generate
    from protocol.sampling_params import SamplingParams

    start = time.perf_counter()
    results = generate(engine, prompts, SamplingParams(max_tokens=output_tokens, ignore_eos=True))
    elapsed = time.perf_counter() - start
    finished = [group[0] for group in results]
    return {"ttft_s": [r.ttft_s for r in finished], "tpot_ms": [(r.tpot_s or 0.0) * 1e3 for r in finished],
            "tokens": [list(r.token_ids)[:COMPARED_TOKENS] for r in finished],
            "output_tok_per_s": sum(len(r.token_ids) for r in finished) / elapsed}


def ours_single(engine, tokens: int, output_tokens: int, seed: int) -> dict:
    """One request; with the Triton kernels it compiled (a compile in a request is its TTFT's)."""
    from model_shards.triton_compiles import TritonCompileLog, summarize

    prompt = random_prompt(tokens, seed, engine.architecture.vocab_size)
    with TritonCompileLog() as compiles:
        run = ours_generate(engine, [prompt], output_tokens)
    return {"ttft_s": run["ttft_s"][0], "tpot_ms": run["tpot_ms"][0], "tokens": run["tokens"][0],
            **summarize(compiles.take())}


def ours_batch(engine, lengths: list[int], output_tokens: int) -> dict:
    prompts = [random_prompt(n, n, engine.architecture.vocab_size) for n in lengths]
    return summarize_batch(ours_generate(engine, prompts, output_tokens))


def summarize_batch(run: dict) -> dict:
    ttfts = run["ttft_s"]
    return {"ttft_mean_s": sum(ttfts) / len(ttfts), "ttft_max_s": max(ttfts),
            "output_tok_per_s": run["output_tok_per_s"], "tokens": run["tokens"]}


def profile_request(engine, tokens: int, seed: int, rows: int = 20) -> dict:
    """One request of a new length (1 output token) under torch.profiler and cProfile; prints the
    ops by host and by device time and the project's Python functions by cumulative time."""
    from torch.profiler import ProfilerActivity, profile

    prompt = random_prompt(tokens, seed, engine.architecture.vocab_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    python = cProfile.Profile()
    with profile(activities=activities) as trace:
        python.enable()
        run = ours_generate(engine, [prompt], 1)
        python.disable()
    averages = trace.key_averages()
    device_sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("cumulative").print_stats("engine/|model_shards/|kvcache/", rows)
    print(f"=== profile of one {tokens}-token request (new tokens, 1 output token), TTFT {run['ttft_s'][0]:.4f} s "
          f"under the profilers ===")
    print(averages.table(sort_by="cpu_time_total", row_limit=rows))
    print(averages.table(sort_by=device_sort, row_limit=rows))
    print(text.getvalue(), flush=True)
    return {"ttft_s": run["ttft_s"][0]}


# --- transformers --------------------------------------------------------------------------------
def load_hf(model_dir: str, device: torch.device):
    """As a user loads it: the folder's generation config (eos ids) kept; min_new_tokens keeps eos
    from ending a row early."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()


class TokenClock:
    """A stopping criterion that never stops: it synchronizes and stamps each generated token."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def hf_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_tokens: int) -> dict:
    """One greedy generate: TTFT, TPOT, output tok/s, the first 8 new tokens of each row."""
    from transformers import StoppingCriteriaList

    clock = TokenClock(input_ids.device)
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize(input_ids.device)
        torch.cuda.reset_peak_memory_stats(input_ids.device)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=output_tokens,
                         min_new_tokens=output_tokens, do_sample=False, stopping_criteria=StoppingCriteriaList([clock]),
                         output_scores=True, return_dict_in_generate=True)  # fmt: skip
    ttft = clock.stamps[0] - start
    total = clock.stamps[-1] - start
    width = input_ids.shape[1]
    return {"ttft_s": ttft, "tpot_ms": (total - ttft) / max(len(clock.stamps) - 1, 1) * 1e3,
            "output_tok_per_s": input_ids.shape[0] * len(clock.stamps) / total,
            "tokens": out.sequences[:, width:width + COMPARED_TOKENS].tolist(),
            "top": top_logits(out.scores[:COMPARED_TOKENS]), "peak_GiB": peak_gib(input_ids.device)}


def top_logits(scores: tuple[torch.Tensor, ...], k: int = 5) -> list[list[list[list[float]]]]:
    """Per row, per greedy step, transformers' k best [token id, logit]: where our token differs
    at a step, its logit there says by how much (a near tie of bf16 logits, or a real difference)."""
    steps = []
    for step in scores:  # (rows, vocab): the logits greedy search took its token from
        values, ids = step.float().topk(k, dim=-1)
        steps.append([[[int(i), round(float(v), 4)] for i, v in zip(row_ids, row_values)]
                      for row_ids, row_values in zip(ids.tolist(), values.tolist())])
    return [list(row) for row in zip(*steps)]  # (rows, steps, k, 2)


def hf_single(model, tokens: int, output_tokens: int, seed: int, device: torch.device) -> dict:
    ids = torch.tensor([random_prompt(tokens, seed, model.config.vocab_size)], device=device)
    run = hf_generate(model, ids, torch.ones_like(ids), output_tokens)
    return {**run, "tokens": run["tokens"][0], "top": run["top"][0]}


def hf_batch(model, lengths: list[int], output_tokens: int, device: torch.device, seed_offset: int = 0) -> dict:
    """All prompts in one generate, left-padded to the longest (mask 0 on the padding); row n's
    prompt from seed n + seed_offset."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.tensor(random_prompt(n, n + seed_offset, model.config.vocab_size), device=device)
        mask[row, width - n:] = 1
    run = hf_generate(model, ids, mask, output_tokens)
    return {"ttft_mean_s": run["ttft_s"], "ttft_max_s": run["ttft_s"], "output_tok_per_s": run["output_tok_per_s"],
            "tokens": run["tokens"], "top": run["top"], "peak_GiB": run["peak_GiB"]}


def hf_single_steady(model, tokens: int, output_tokens: int, seed: int, device: torch.device,
                     first_seed_offset: int) -> dict:
    """hf_single at a shape run just before: first the same length and output count with other
    tokens (seed + first_seed_offset), whose figures go under "first_call", then the prompt of
    `seed`, measured (its greedy tokens compare with ours)."""
    first = hf_single(model, tokens, output_tokens, seed + first_seed_offset, device)
    return {**hf_single(model, tokens, output_tokens, seed, device), "first_call": timings(first)}


def hf_batch_steady(model, lengths: list[int], output_tokens: int, device: torch.device,
                    first_seed_offset: int) -> dict:
    """hf_batch after the same lengths with other tokens (under "first_call")."""
    first = hf_batch(model, lengths, output_tokens, device, first_seed_offset)
    return {**hf_batch(model, lengths, output_tokens, device), "first_call": timings(first)}


def timings(run: dict) -> dict:
    return {key: value for key, value in run.items() if key not in ("tokens", "top", "peak_GiB")}


def sdpa_choices(model, tokens: int, device: torch.device) -> dict:
    """The SDPA backend torch picks for transformers' attention at `tokens` (batch 1, no padding):
    the prefill (queries a transposed view of the projection, keys contiguous from the cache's
    concatenation, causal) and a decode step (one query over tokens + 1 keys); GQA passed as
    enable_gqa, as transformers' sdpa_attention_forward does without a mask."""
    from torch.nn.attention import SDPBackend

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = {int(backend): name for name, backend in SDPBackend.__members__.items()}
    report = {"cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}
    for case, queries, keys in (("prefill", tokens, tokens), ("decode", 1, tokens + 1)):
        query = torch.empty(1, queries, heads, head_dim, dtype=model.dtype, device=device).transpose(1, 2)
        key = torch.empty(1, kv_heads, keys, head_dim, dtype=model.dtype, device=device)
        try:
            choice = torch._fused_sdp_choice(query, key, key, None, 0.0, queries > 1, scale=None,
                                             enable_gqa=heads != kv_heads)
            report[case] = names.get(int(choice), str(choice))
        except Exception as error:  # noqa: BLE001 - a private torch function: reported, not fatal
            report[case] = f"{type(error).__name__}: {str(error)[:120]}"
    return report


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
