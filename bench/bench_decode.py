"""Batch-1 decode: qwenlab's engine vs transformers on the same random bf16 checkpoint, with the roofline.

For each shape (Qwen3-0.6B, Qwen2.5-0.5B by default): the machine's read bandwidth (fp32 matrix-vector over
1 GiB, all threads), the bytes one decode step reads (every weight once, the tied LM head, the KV cache),
hence the roofline tokens/s; then qwenlab and transformers alternate ``--runs`` times, each run decoding
``--new-tokens`` greedy tokens after a ``--prompt-len`` prompt. Medians; achieved GB/s = tok/s x bytes.
A last run in a fresh process measures qwenlab's peak RSS against weights + KV budget.

    .venv/bin/python bench/bench_decode.py --runs 5
    .venv/bin/python bench/bench_decode.py --shapes qwen3-0.6b --runs 3 --stock   # also without the CPU kernels
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys

import torch

from engine_bench_utils import (checkpoint, decode_bytes_per_token, engine_decode_rate, load_transformers, machine,
                                peak_rss_bytes, read_bandwidth, save, transformers_decode_rate)

KV_BUDGET = "256MiB"


def measure_rss(directory: str, prompt_len: int, new_tokens: int) -> None:
    """Child process: load the engine, decode, print peak RSS and its parts as JSON."""
    from qwenlab.engine import LLMEngine, kernels

    kernels.load()
    baseline = peak_rss_bytes()  # Python, torch and the kernels, before any weights
    engine = LLMEngine(directory, dtype="bfloat16", kv_cache_memory=KV_BUDGET, log_stats=False)
    engine_decode_rate(engine, prompt_len, new_tokens)
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())  # tied head counted once
    print(json.dumps({"peak_rss": peak_rss_bytes(), "baseline": baseline, "weights": weights,
                      "kv": engine.runner.kv_cache_bytes}))


def bench_shape(name: str, args) -> dict:
    from qwenlab.engine import LLMEngine

    directory = checkpoint(name)
    bandwidth = read_bandwidth()
    engine = LLMEngine(directory, dtype="bfloat16", kv_cache_memory=KV_BUDGET, log_stats=False)
    config = engine.model_config
    per_token = decode_bytes_per_token(config, 2, context=args.prompt_len + args.new_tokens // 2)
    engine_decode_rate(engine, args.prompt_len, 4)  # warm-up (first-call costs)
    hf = None if args.skip_transformers else load_transformers(directory)
    if hf is not None:
        transformers_decode_rate(hf, args.prompt_len, 2)
    ours, theirs = [], []
    for _ in range(args.runs):  # alternate, so both see the same machine noise
        ours.append(engine_decode_rate(engine, args.prompt_len, args.new_tokens))
        if hf is not None:
            theirs.append(transformers_decode_rate(hf, args.prompt_len, args.new_tokens))
    stock = []
    if args.stock:
        del engine
        gc.collect()
        engine = LLMEngine(directory, dtype="bfloat16", kv_cache_memory=KV_BUDGET, log_stats=False, use_kernels=False)
        engine_decode_rate(engine, args.prompt_len, 2)
        stock = [engine_decode_rate(engine, args.prompt_len, args.new_tokens) for _ in range(args.runs)]
    del engine, hf
    gc.collect()
    rss = json.loads(subprocess.run([sys.executable, __file__, "--rss-child", str(directory), "--prompt-len",
                                     str(args.prompt_len), "--new-tokens", str(args.new_tokens)],
                                    capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    result = {
        "shape": name, "bandwidth_gbs": bandwidth, "bytes_per_token": per_token,
        "roofline_tok_s": bandwidth * 1e9 / per_token,
        "qwenlab_tok_s": statistics.median(ours), "qwenlab_runs": ours,
        "transformers_tok_s": statistics.median(theirs) if theirs else None, "transformers_runs": theirs,
        "stock_torch_tok_s": statistics.median(stock) if stock else None, "rss": rss,
    }
    result["achieved_gbs"] = result["qwenlab_tok_s"] * per_token / 1e9
    result["fraction_of_roofline"] = result["qwenlab_tok_s"] / result["roofline_tok_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "qwen2.5-0.5b"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--stock", action="store_true", help="also run the engine without the CPU kernels")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        measure_rss(args.rss_child, args.prompt_len, args.new_tokens)
        return
    results = {"machine": machine(), "args": vars(args), "shapes": [bench_shape(s, args) for s in args.shapes]}
    print(f"\nbatch-1 bf16 decode, {args.new_tokens} tokens after {args.prompt_len}, medians of {args.runs} "
          f"(load avg {results['machine']['load_avg'][0]:.1f})")
    print(f"{'shape':14s} {'qwenlab':>9s} {'transf.':>9s} {'ratio':>6s} {'roofline':>9s} {'of roof':>8s} "
          f"{'GB/s':>6s} {'bw GB/s':>8s}  peak RSS - runtime / weights+KV")
    for r in results["shapes"]:
        hf = r["transformers_tok_s"]
        rss = r["rss"]
        print(f"{r['shape']:14s} {r['qwenlab_tok_s']:9.2f} {hf or float('nan'):9.2f} "
              f"{(r['qwenlab_tok_s'] / hf) if hf else float('nan'):5.2f}x {r['roofline_tok_s']:9.2f} "
              f"{r['fraction_of_roofline']:7.0%} {r['achieved_gbs']:6.1f} {r['bandwidth_gbs']:8.1f} "
              f"  {rss['peak_rss'] / 2**30:.2f} - {rss['baseline'] / 2**30:.2f} / "
              f"{(rss['weights'] + rss['kv']) / 2**30:.2f} GiB "
              f"({(rss['peak_rss'] - rss['baseline']) / (rss['weights'] + rss['kv']) - 1:+.0%})")
        if r["stock_torch_tok_s"]:
            print(f"{'':14s} engine without the CPU kernels: {r['stock_torch_tok_s']:.2f} tok/s")
    print(f"wrote {save('decode', results)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
