"""512-token prefill: qwenlab's engine (one step, first token sampled) vs a transformers forward.

Random bf16 checkpoints shaped like Qwen3-0.6B and Qwen2.5-0.5B. qwenlab: the wall time of the engine step
that computes the whole prompt and samples the first token. transformers: ``model(ids, logits_to_keep=1)``
on the same ids. Alternating runs, medians; tokens/s and achieved GFLOP/s (2 x non-embedding parameters per
token, attention excluded).

    .venv/bin/python bench/bench_prefill.py --runs 5
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from engine_bench_utils import checkpoint, load_transformers, machine, save


def ours_prefill(engine, prompt: list[int], tag: str) -> float:
    from qwenlab.engine import SamplingParams

    engine.add_request(tag, prompt, SamplingParams(max_tokens=1, temperature=0))
    start = time.perf_counter()
    engine.step()
    elapsed = time.perf_counter() - start
    assert not engine.has_unfinished_requests()
    return elapsed


def transformers_prefill(model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, logits_to_keep=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "qwen2.5-0.5b"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from qwenlab.engine import LLMEngine

    results = []
    for shape in args.shapes:
        directory = checkpoint(shape)
        engine = LLMEngine(directory, dtype="bfloat16", kv_cache_memory="256MiB", log_stats=False,
                           enable_prefix_caching=False)
        model = load_transformers(directory)
        prompt = [(1000 + 7 * i) % 150000 for i in range(args.tokens)]
        ours_prefill(engine, prompt, "warm")
        transformers_prefill(model, prompt)
        ours, theirs = [], []
        for run in range(args.runs):
            ours.append(ours_prefill(engine, prompt, f"p{run}"))
            theirs.append(transformers_prefill(model, prompt))
        flops = 2 * engine.model_config.param_counts()["non_embedding"] * args.tokens
        result = {"shape": shape, "qwenlab_s": statistics.median(ours), "qwenlab_runs": ours,
                  "transformers_s": statistics.median(theirs), "transformers_runs": theirs}
        result["qwenlab_tok_s"] = args.tokens / result["qwenlab_s"]
        result["transformers_tok_s"] = args.tokens / result["transformers_s"]
        result["qwenlab_gflops"] = flops / result["qwenlab_s"] / 1e9
        result["transformers_gflops"] = flops / result["transformers_s"] / 1e9
        results.append(result)
        del engine, model
        gc.collect()
    data = {"machine": machine(), "args": vars(args), "shapes": results}
    print(f"\n{args.tokens}-token prefill, bf16, medians of {args.runs} (load avg {data['machine']['load_avg'][0]:.1f})")
    print(f"{'shape':14s} {'qwenlab s':>10s} {'transf. s':>10s} {'speed-up':>9s} {'qwenlab tok/s':>14s} {'GFLOP/s':>8s}")
    for r in results:
        print(f"{r['shape']:14s} {r['qwenlab_s']:10.3f} {r['transformers_s']:10.3f} "
              f"{r['transformers_s'] / r['qwenlab_s']:8.2f}x {r['qwenlab_tok_s']:14.1f} {r['qwenlab_gflops']:8.1f}")
    print(f"wrote {save('prefill', data)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
