"""GPU benchmark (CUDA only): nano-vllm's offline workload and batch-1 decode on a Qwen3-0.6B-shaped model.

Workload as nano-vllm's bench.py: 256 sequences, prompt and output lengths uniform in 100-1024 (random
token ids), ignore_eos, temperature 0.6; prints output tokens/s. Then batch-1 decode tokens/s and the
achieved bandwidth (bytes of bf16 weights read per token x tokens/s) against the GPU's nominal bandwidth.
Uses a random bf16 checkpoint (created once) unless ``--model`` names a real one.

    .venv/bin/python bench/bench_gpu.py                 # needs a CUDA device
    .venv/bin/python bench/bench_gpu.py --model /path/to/Qwen3-0.6B
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from engine_bench_utils import checkpoint, decode_bytes_per_token, engine_decode_rate, machine, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--kv-cache-memory", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    from qwenlab.engine import LLMEngine, SamplingParams

    directory = args.model or checkpoint("qwen3-0.6b")
    engine = LLMEngine(directory, dtype="bfloat16", device="cuda", max_model_len=4096,
                       kv_cache_memory=args.kv_cache_memory, log_stats=True)
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(args.min_len, args.max_len))]
               for _ in range(args.num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(args.min_len, args.max_len))
              for _ in range(args.num_seqs)]
    engine.add_request("warm", [1, 2, 3], SamplingParams(max_tokens=8))  # capture the first graphs
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"s{i}", prompt, p)
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    total = sum(p.max_tokens for p in params)
    throughput = total / elapsed
    print(f"nano-vllm workload: {total} output tokens in {elapsed:.2f} s = {throughput:.0f} tok/s")
    engine_decode_rate(engine, 16, 8)
    rate = engine_decode_rate(engine, 16, 256)
    per_token = decode_bytes_per_token(engine.model_config, 2, context=16 + 128)
    name = torch.cuda.get_device_name()
    print(f"batch-1 decode: {rate:.1f} tok/s, {rate * per_token / 1e9:.0f} GB/s achieved on {name}")
    save("gpu", {"machine": machine(), "device": name, "throughput_tok_s": throughput, "elapsed_s": elapsed,
                 "output_tokens": total, "batch1_tok_s": rate, "batch1_gbs": rate * per_token / 1e9})


if __name__ == "__main__":
    main()
