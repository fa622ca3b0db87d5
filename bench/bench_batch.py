"""Continuous batching: 32 concurrent requests vs batch-1 decode, and transformers' batched generate.

Qwen3-0.6B-shaped random bf16 checkpoint. ``--requests`` requests with distinct ``--prompt-len`` prompts and
``--new-tokens`` sampled tokens each (temperature 0.6, seeded, ignore_eos) are submitted at once; the
aggregate output tokens/s covers everything from submission to the last token (prefills included).
Batch-1 decode of the same engine is measured in the same run; transformers generates the same batch
(equal-length prompts, no padding) with sampling. Medians of ``--runs``.

    .venv/bin/python bench/bench_batch.py --runs 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from engine_bench_utils import checkpoint, engine_decode_rate, load_transformers, machine, save


def ours_aggregate(engine, prompts: list[list[int]], new_tokens: int) -> float:
    from qwenlab.engine import SamplingParams

    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b{i}", prompt, SamplingParams(max_tokens=new_tokens, temperature=0.6, seed=i,
                                                           ignore_eos=True))
    produced = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                produced += out.num_completion_tokens
    return produced / (time.perf_counter() - start)


def transformers_aggregate(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                             temperature=0.6, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    from qwenlab.engine import LLMEngine

    directory = checkpoint(args.shape)
    prompts = [[(1000 + 37 * i + j) % 150000 for j in range(args.prompt_len)] for i in range(args.requests)]
    engine = LLMEngine(directory, dtype="bfloat16", kv_cache_memory="1GiB", max_num_seqs=max(32, args.requests),
                       log_stats=False)
    engine_decode_rate(engine, 16, 4)
    ours_aggregate(engine, prompts[:4], 4)  # warm-up
    engine.block_manager.reset_prefix_cache()
    single, batched = [], []
    for run in range(args.runs):
        single.append(engine_decode_rate(engine, 16, 32))
        batched.append(ours_aggregate(engine, [[run] + p[1:] for p in prompts], args.new_tokens))
    del engine
    gc.collect()
    theirs = []
    if not args.skip_transformers:
        model = load_transformers(directory)
        theirs = [transformers_aggregate(model, prompts, args.new_tokens) for _ in range(args.runs)]
    result = {"machine": machine(), "args": vars(args), "batch1_tok_s": statistics.median(single),
              "batch1_runs": single, "aggregate_tok_s": statistics.median(batched), "aggregate_runs": batched,
              "transformers_aggregate_tok_s": statistics.median(theirs) if theirs else None,
              "transformers_runs": theirs}
    result["aggregate_over_batch1"] = result["aggregate_tok_s"] / result["batch1_tok_s"]
    print(f"\n{args.requests} concurrent requests x {args.new_tokens} tokens (prompts {args.prompt_len}), medians of "
          f"{args.runs} (load avg {result['machine']['load_avg'][0]:.1f})")
    print(f"qwenlab batch-1 decode      {result['batch1_tok_s']:8.2f} tok/s")
    print(f"qwenlab {args.requests} concurrent        {result['aggregate_tok_s']:8.2f} tok/s "
          f"({result['aggregate_over_batch1']:.1f}x batch-1)")
    if theirs:
        print(f"transformers batched generate {result['transformers_aggregate_tok_s']:6.2f} tok/s "
              f"(qwenlab {result['aggregate_tok_s'] / result['transformers_aggregate_tok_s']:.2f}x)")
    print(f"wrote {save('batch', result)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
