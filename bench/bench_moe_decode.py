"""MoE batch-1 decode: Qwen3-30B-A3B-shaped (128 experts of 768, top-8) with fewer layers, vs transformers.

qwenlab's engine reads only the 8 experts each token routes to; the roofline counts exactly those bytes
(attention, router, 8 experts per layer, the LM head, the KV cache). transformers runs each of its experts
implementations (eager, batched_mm, grouped_mm) on the same checkpoint; the fastest is the reference.
Medians of ``--runs``; the models are loaded one at a time (about 5 GB each in bf16).

    .venv/bin/python bench/bench_moe_decode.py --runs 3
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from engine_bench_utils import (checkpoint, decode_bytes_per_token, engine_decode_rate, load_transformers, machine,
                                read_bandwidth, save, transformers_decode_rate)

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-30b-a3b-4l")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS))
    args = parser.parse_args()
    from qwenlab.engine import LLMEngine

    directory = checkpoint(args.shape)
    bandwidth = read_bandwidth()
    engine = LLMEngine(directory, dtype="bfloat16", kv_cache_memory="128MiB", log_stats=False)
    config = engine.model_config
    per_token = decode_bytes_per_token(config, 2, context=args.prompt_len + args.new_tokens // 2)
    engine_decode_rate(engine, args.prompt_len, 4)
    ours = [engine_decode_rate(engine, args.prompt_len, args.new_tokens) for _ in range(args.runs)]
    del engine
    gc.collect()
    theirs = {}
    for implementation in args.implementations:
        try:
            model = load_transformers(directory, implementation)
        except Exception as exc:  # an implementation this build cannot dispatch
            print(f"transformers {implementation}: unavailable ({type(exc).__name__}: {exc})")
            continue
        transformers_decode_rate(model, args.prompt_len, 2)
        theirs[implementation] = [transformers_decode_rate(model, args.prompt_len, args.new_tokens)
                                  for _ in range(args.runs)]
        del model
        gc.collect()
    medians = {k: statistics.median(v) for k, v in theirs.items()}
    best = max(medians, key=medians.get) if medians else None
    result = {"machine": machine(), "args": vars(args), "bandwidth_gbs": bandwidth, "active_bytes_per_token": per_token,
              "roofline_tok_s": bandwidth * 1e9 / per_token, "qwenlab_tok_s": statistics.median(ours),
              "qwenlab_runs": ours, "transformers_tok_s": medians, "transformers_runs": theirs,
              "transformers_best": best}
    result["fraction_of_roofline"] = result["qwenlab_tok_s"] / result["roofline_tok_s"]
    print(f"\n{args.shape} batch-1 bf16 decode, medians of {args.runs} (load avg {result['machine']['load_avg'][0]:.1f})")
    print(f"bandwidth {bandwidth:.1f} GB/s; active bytes/token {per_token / 1e9:.3f} GB -> roofline "
          f"{result['roofline_tok_s']:.2f} tok/s")
    print(f"qwenlab                    {result['qwenlab_tok_s']:7.2f} tok/s ({result['fraction_of_roofline']:.0%} of "
          f"roofline, {result['qwenlab_tok_s'] * per_token / 1e9:.1f} GB/s)")
    for name, value in medians.items():
        print(f"transformers {name:13s} {value:7.2f} tok/s (qwenlab {result['qwenlab_tok_s'] / value:.1f}x)")
    print(f"wrote {save('moe_decode', result)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
