"""Tables of bench/vs_transformers.py: longctx against transformers per length and per batch."""

from __future__ import annotations


def print_report(report: dict) -> None:
    ours, hf = report.get("ours", {}), report.get("transformers", {})
    first = ours or hf
    print(f"\n{first.get('device')}, torch {first.get('torch')}, {report['layers']} layers of the 8B shape, "
          f"{report['output_tokens']} output tokens")
    print_first_requests(ours)
    print_single(ours, hf)
    print_batches(ours, hf)
    if "ours_unfused" in report:
        print_fused_ab(ours, report["ours_unfused"])
    print_diagnostic(hf)


def print_fused_ab(fused: dict, unfused: dict) -> None:
    """The fused layer kernels (the default) against torch's elementwise ops, same lengths."""
    print("\nfused layer kernels (default) / torch's ops: TTFT s new, TTFT s again, TPOT ms; batches: output tok/s")
    for tokens, mine in fused.get("single", {}).items():
        theirs, again = unfused.get("single", {}).get(tokens, {}), fused.get("repeat", {}).get(tokens, {})
        their_again = unfused.get("repeat", {}).get(tokens, {})
        print(f"{tokens:>8} {seconds(mine, 'ttft_s'):>7} / {seconds(theirs, 'ttft_s'):>7}   "
              f"{seconds(again, 'ttft_s'):>7} / {seconds(their_again, 'ttft_s'):>7}   "
              f"{milliseconds(mine):>6} / {milliseconds(theirs):>6}")
    for name, mine in fused.get("batch", {}).items():
        print(f"{name:>16} {rate(mine):>10} / {rate(unfused.get('batch', {}).get(name, {})):>10}")


def print_single(ours: dict, hf: dict) -> None:
    print("\none request: TTFT s (ours: a new length / the same length again), TPOT ms, greedy first 8 equal;"
          "\nHF: transformers at a shape it ran just before (steady state), HF 1st: its first call at that length")
    print(f"{'tokens':>8} {'ours':>7} {'again':>7} {'HF':>7} {'HF 1st':>7} {'HF/again':>8} | {'ours':>6} {'HF':>6} "
          f"{'HF/ours':>7} {'HF 1st':>7} | same8 (step:logit gap)  HF peak GiB")
    for tokens, mine in ours.get("single", {}).items():
        theirs = hf.get("single", {}).get(tokens, {})
        first = theirs.get("first_call", {})
        again = ours.get("repeat", {}).get(tokens, {})
        print(f"{tokens:>8} {seconds(mine, 'ttft_s'):>7} {seconds(again, 'ttft_s'):>7} {seconds(theirs, 'ttft_s'):>7} "
              f"{seconds(first, 'ttft_s'):>7} {ratio(theirs, again, 'ttft_s'):>8} | {milliseconds(mine):>6} "
              f"{milliseconds(theirs):>6} {ratio(theirs, mine, 'tpot_ms'):>7} {milliseconds(first):>7} | "
              f"{same_tokens(mine, theirs):>9}  {gib(theirs)}")


def print_first_requests(ours: dict) -> None:
    """The engine's first requests after start (warm-up lengths) and the measured ones: the
    Triton kernels each compiled (a compile inside a request is part of its TTFT)."""
    rows = [("first " + str(tokens), result) for tokens, result in ours.get("warmup", {}).items()]
    rows += [(str(tokens), result) for tokens, result in ours.get("single", {}).items()]
    print("\nTriton compiles inside requests (first requests after start, then the measured ones)")
    for name, result in rows:
        print(f"{name:>12} TTFT {seconds(result, 'ttft_s'):>7} s, {result.get('triton_compiles', '-')} compiles "
              f"({result.get('triton_compile_s', '-')} s) {result.get('triton_compiled', '')}")


def print_batches(ours: dict, hf: dict) -> None:
    print("\nbatches submitted together: TTFT mean / max s, output tok/s, rows with greedy first 8 equal "
          "(HF: steady state, HF 1st: its first call at those lengths)")
    print(f"{'batch':>16} {'ours TTFT':>15} {'HF TTFT':>15} {'HF 1st TTFT':>15} | {'ours tok/s':>10} {'HF tok/s':>9} "
          f"{'HF 1st':>7} | same8")
    for name, mine in ours.get("batch", {}).items():
        theirs = hf.get("batch", {}).get(name, {})
        first = theirs.get("first_call", {})
        print(f"{name:>16} {pair(mine):>15} {pair(theirs):>15} {pair(first):>15} | {rate(mine):>10} "
              f"{rate(theirs):>9} {rate(first):>7} | {rows_equal(mine, theirs)}")


def print_diagnostic(hf: dict) -> None:
    sdpa = hf.get("sdpa", {})
    if "prefill" in sdpa:
        cudnn = "CUDNN" in f"{sdpa['prefill']} {sdpa['decode']}"
        print(f"\ntransformers' attention: torch's SDPA picks {sdpa['prefill']} for its prefill, {sdpa['decode']} "
              f"for a decode step (cuDNN {sdpa.get('cudnn')})" + ("; cuDNN plans each new shape once" if cudnn else ""))
    for tokens, rows in hf.get("diagnostic", {}).items():
        print(f"\ntransformers at {tokens}, a length no case ran: generate calls on one model, then one at another "
              f"new length without cuDNN: TTFT s, TPOT ms")
        for name, result in rows.items():
            print(f"{name:>20} {seconds(result, 'ttft_s'):>7} {milliseconds(result):>7}")


def gib(result: dict) -> str:
    return f"{result['peak_GiB']:.2f}" if "peak_GiB" in result else ""


def seconds(result: dict, key: str) -> str:
    return f"{result[key]:.3f}" if key in result else short(result)


def milliseconds(result: dict) -> str:
    return f"{result['tpot_ms']:.2f}" if "tpot_ms" in result else short(result)


def ratio(theirs: dict, mine: dict, key: str) -> str:
    return f"{theirs[key] / mine[key]:.2f}" if key in theirs and key in mine else "-"


def pair(result: dict) -> str:
    if "ttft_mean_s" not in result:
        return short(result)
    return f"{result['ttft_mean_s']:.3f}/{result['ttft_max_s']:.3f}"


def rate(result: dict) -> str:
    return f"{result['output_tok_per_s']:.0f}" if "output_tok_per_s" in result else short(result)


def same_tokens(mine: dict, theirs: dict) -> str:
    """True, or where ours first differs: `step:gap`, our token's logit below transformers' best
    at that step in its own logits (a near tie of bf16 logits is a few hundredths), `step:?` when
    ours is not among its top ones."""
    if "tokens" not in mine or "tokens" not in theirs:
        return "-"
    return first_difference(mine["tokens"], theirs["tokens"], theirs.get("top"))


def first_difference(ours: list[int], theirs: list[int], top: list | None) -> str:
    step = next((index for index, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if step is None:
        return "True"
    logits = dict((int(token), logit) for token, logit in top[step]) if top and step < len(top) else {}
    if ours[step] not in logits:
        return f"{step + 1}:?"
    return f"{step + 1}:{max(logits.values()) - logits[ours[step]]:.3f}"


def rows_equal(mine: dict, theirs: dict) -> str:
    """Rows with equal tokens; then each differing row's `first_difference`."""
    if "tokens" not in mine or "tokens" not in theirs:
        return "-"
    tops = theirs.get("top") or [None] * len(theirs["tokens"])
    cells = [first_difference(a, b, top) for a, b, top in zip(mine["tokens"], theirs["tokens"], tops)]
    differing = " ".join(cell for cell in cells if cell != "True")
    return f"{cells.count('True')}/{len(mine['tokens'])}" + (f" ({differing})" if differing else "")


def short(result: dict) -> str:
    """OOM, skipped or error, in a table cell."""
    if not result:
        return "-"
    text = str(result.get("error") or result.get("skipped") or "?")
    return "OOM" if "out of memory" in text else text[:7]
