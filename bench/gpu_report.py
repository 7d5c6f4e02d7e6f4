"""The tables and goal checks that bench/gpu.py prints last, from its JSON report."""

from __future__ import annotations

from bench.gpu_cases import prefill_flops


def _get(row: dict | None, *keys, default=None):
    for key in keys:
        if not isinstance(row, dict) or key not in row:
            return default
        row = row[key]
    return row


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _why(row: dict | None) -> str:
    """'OOM', 'skip' or 'err' for a case that did not run, else ''."""
    if not isinstance(row, dict):
        return "-"
    if row.get("error") == "out of memory":
        return "OOM"
    return "skip" if "skipped" in row else ("err" if "error" in row else "")


def prefill_table(report: dict, lengths: list[int], layers: int) -> list[str]:
    matmul = _get(report, "matmul", "TFLOPs")
    lines = [f"prefill, one request ({layers}-layer 8B-shaped model, whole-model TTFT; MFU against the "
             f"measured bf16 matmul rate {_fmt(matmul, '.0f')} TFLOP/s)",
             f"{'tokens':>8} {'TTFT ours':>10} {'TTFT HF':>9} {'x':>6} {'MFU ours':>9} {'MFU HF':>7} "
             f"{'attn ours':>10} {'raw cuDNN':>10} {'of raw':>7}"]
    for tokens in lengths:
        ours = _get(report, "engine", tokens, "single")
        hf = _get(report, "transformers", tokens)
        ttft, hf_ttft = _get(ours, "ttft_s"), _get(hf, "ttft_s")
        flops = prefill_flops(tokens, layers) / 1e12
        attention_ours = _get(report, "attention", tokens, "ours", "TFLOPs")
        attention_raw = _get(report, "attention", tokens, "raw", "TFLOPs")
        lines.append(
            f"{tokens:>8} {_fmt(ttft) if ttft else _why(ours):>10} {_fmt(hf_ttft) if hf_ttft else _why(hf):>9} "
            f"{_fmt(hf_ttft / ttft if ttft and hf_ttft else None, '.2f'):>6} "
            f"{_fmt(flops / ttft / matmul if ttft and matmul else None, '.0%'):>9} "
            f"{_fmt(flops / hf_ttft / matmul if hf_ttft and matmul else None, '.0%'):>7} "
            f"{_fmt(attention_ours, '.0f'):>10} {_fmt(attention_raw, '.0f'):>10} "
            f"{_fmt(attention_ours / attention_raw if attention_ours and attention_raw else None, '.0%'):>7}")
    return lines


def decode_table(report: dict, lengths: list[int], batches: list[int]) -> list[str]:
    copy = _get(report, "copy", "GBps")
    wide = batches[-1]
    lines = [f"decode (engine: time per output token; kernel: one layer's paged attention, device time as the "
             f"engine's CUDA graphs run it, KV GB/s against the measured copy rate {_fmt(copy, '.0f')} GB/s; "
             f"host-timed single calls in the JSON, host_ms)",
             f"{'tokens':>8} {'TPOT ours':>10} {'TPOT HF':>8} {'x':>6} {f'ours b{wide}':>9} "
             + " ".join(f"{f'kern b{b} ms':>12} {'GB/s':>6} {'of copy':>7}" for b in batches)]
    for tokens in lengths:
        tpot = _get(report, "engine", tokens, "single", "tpot_ms")
        hf_tpot = _get(report, "transformers", tokens, "tpot_ms")
        line = (f"{tokens:>8} {_fmt(tpot):>10} {_fmt(hf_tpot):>8} "
                f"{_fmt(hf_tpot / tpot if tpot and hf_tpot else None, '.2f'):>6} "
                f"{_fmt(_get(report, 'engine', tokens, 'batch', 'tpot_ms_median')):>9}")
        for batch in batches:
            kernel = _get(report, "decode_kernel", tokens, batch)
            rate = _get(kernel, "GBps")
            line += (f" {_fmt(_get(kernel, 'ms')) if rate else _why(kernel):>12} {_fmt(rate, '.0f'):>6} "
                     f"{_fmt(rate / copy if rate and copy else None, '.0%'):>7}")
        lines.append(line)
    return lines


def decode_sweep_lines(report: dict) -> list[str]:
    """Per case: the default plan's rate and the five fastest plans (device time, graph replay)."""
    from model_shards.attention.triton_paged_decode import DEFAULT_PLAN

    copy = _get(report, "copy", "GBps")
    lines = [f"paged decode plans, one layer (device time per call; copy {_fmt(copy, '.0f')} GB/s); "
             f"default {DEFAULT_PLAN}"]
    keys = ("max_splits", "min_split_tiles", "tile_tokens", "num_warps", "num_stages")
    for case, rows in (report.get("decode_sweep") or {}).items():
        if not isinstance(rows, list):
            continue
        ran = sorted((row for row in rows if "GBps" in row), key=lambda row: -row["GBps"])
        default = [row for row in ran if all(row[key] == getattr(DEFAULT_PLAN, key) for key in keys)]
        describe = lambda row: (f"{'/'.join(str(row[key]) for key in keys)}: {row['ms']:.3f} ms "
                                f"{row['GBps']:.0f} GB/s ({row['GBps'] / copy:.0%})" if copy else "")
        lines.append(f"  {case}: default {describe(default[0]) if default else '-'}; failed {len(rows) - len(ran)}")
        lines += [f"    {describe(row)}" for row in ran[:5]]
    return lines


def step_sweep_lines(report: dict) -> list[str]:
    sweep = report.get("step_sweep") or {}
    if not sweep:
        return []
    raw = _get(report, "attention", sweep.get("tokens"), "raw", "TFLOPs")
    lines = [f"prefill attention at {sweep.get('tokens')} tokens by step budget (one layer; raw cuDNN "
             f"{_fmt(raw, '.0f')} TFLOP/s)"]
    for step, row in (sweep.get("rows") or {}).items():
        rate = _get(row, "TFLOPs")
        lines.append(f"  {step:>6}-token steps: {_fmt(rate, '.0f') if rate else _why(row)} TFLOP/s"
                     f" ({_fmt(rate / raw if rate and raw else None, '.0%')} of raw)")
    return lines


def correctness_lines(report: dict) -> list[str]:
    lines = ["correctness"]
    for row in report.get("triton_vs_reference") or []:
        if isinstance(row, dict) and "relative_error" in row:
            lines.append(f"  Triton paged decode vs torch reference, block {row['block_size']}, "
                         f"{row['heads']}/{row['kv_heads']} heads, {row['splits']} splits: "
                         f"relative error {row['relative_error']:.2e} ({'pass' if row['pass'] else 'FAIL'} < 1e-2)")
    tolerance = report["logit_tolerance"]
    for tokens, row in (report.get("accuracy") or {}).items():
        ours, hf = _get(row, "ours_bf16"), _get(row, "transformers_bf16")
        if not ours:
            lines.append(f"  logits at {tokens}: {row}")
            continue
        lines.append(f"  bf16 logits at {tokens} vs float32 dense (last 64 positions): ours rel. error "
                     f"{ours['relative_error']:.2e}, top-1 {ours['top1_agreement']:.0%}; transformers bf16 "
                     f"{hf['relative_error']:.2e}, top-1 {hf['top1_agreement']:.0%}; tolerance "
                     f"<= {tolerance['relative_error']}, >= {tolerance['top1_agreement']:.0%}: "
                     f"{'pass' if row['pass'] else 'FAIL'}")
    return lines


def goal_lines(report: dict, lengths: list[int], batches: list[int], layers: int) -> list[str]:
    """The issue's goals on the H200, at >= 128K tokens, each PASS / FAIL / not measured."""
    long = [t for t in lengths if t >= 131072]
    matmul, copy = _get(report, "matmul", "TFLOPs"), _get(report, "copy", "GBps")
    checks = []
    for tokens in long:
        ours, raw = _get(report, "attention", tokens, "ours", "TFLOPs"), _get(report, "attention", tokens, "raw", "TFLOPs")
        checks.append((f"prefill attention >= 90% of raw cuDNN at {tokens}", ours and raw and ours / raw, 0.9))
        ttft = _get(report, "engine", tokens, "single", "ttft_s")
        mfu = ttft and matmul and prefill_flops(tokens, layers) / 1e12 / ttft / matmul
        checks.append((f"whole-model prefill MFU >= 70% at {tokens}", mfu, 0.7))
        for batch in batches:
            rate = _get(report, "decode_kernel", tokens, batch, "GBps")
            checks.append((f"paged decode KV read >= 85% of copy at {tokens}, batch {batch}",
                           rate and copy and rate / copy, 0.85))
    for tokens in long:
        hf_ttft = _get(report, "transformers", tokens, "ttft_s")
        ttft = _get(report, "engine", tokens, "single", "ttft_s")
        hf_oom = ttft and _get(report, "transformers", tokens, "error") == "out of memory"
        checks.append((f"TTFT >= 5x faster than transformers at {tokens} (or it runs out of memory where we don't)",
                       float("inf") if hf_oom else (hf_ttft and ttft and hf_ttft / ttft), 5.0))
    return ["goals"] + [f"  {'PASS' if value and value >= goal else ('FAIL' if value else 'n/a ')} {name}: "
                        f"{_fmt(value, '.2f')}" for name, value, goal in checks]


def print_report(report: dict, args) -> None:
    print()
    for block in (prefill_table(report, args.lengths, args.layers),
                  decode_table(report, args.lengths, args.batches),
                  decode_sweep_lines(report),
                  step_sweep_lines(report),
                  correctness_lines(report),
                  goal_lines(report, args.lengths, args.batches, args.layers)):
        print("\n".join(block))
        print()
