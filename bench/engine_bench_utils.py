"""Shared pieces of the engine benchmarks (bench_decode, bench_batch, bench_prefill, bench_moe_decode).

Random bf16 checkpoints of official shapes (cached in ~/.cache/qwenlab/bench), the machine's read
bandwidth, bytes read per decoded token, timing medians, and a transformers baseline on the same files.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CACHE = Path(os.environ.get("QWENLAB_BENCH_CACHE", Path.home() / ".cache" / "qwenlab" / "bench"))
RESULTS = REPO / "bench" / "results"

SHAPES = {
    "qwen3-0.6b": ("qwen3-0.6b", {}),
    "qwen2.5-0.5b": ("qwen2.5-0.5b", {}),
    # Qwen3-30B-A3B widths (128 experts of 768, top-8, hidden 2048, 32/4 heads), fewer layers to fit in RAM.
    "qwen3-30b-a3b-4l": ("qwen3-30b-a3b", {"num_hidden_layers": 4}),
}


def checkpoint(name: str) -> Path:
    """A random bf16 checkpoint of the named shape, created once (per-tensor, never a full fp32 copy)."""
    from qwenlab.checkpoint import build_empty, save_model
    from qwenlab.config import preset

    directory = CACHE / name
    if (directory / "config.json").is_file():
        return directory
    base, overrides = SHAPES[name]
    config = preset(base, **overrides)
    print(f"creating random bf16 checkpoint {directory} ...", file=sys.stderr)
    model = build_empty(config, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.fill_(1.0)
            elif pname.endswith("bias"):
                param.zero_()
            else:
                for chunk in param.view(-1).split(2**24):
                    chunk.copy_(torch.randn(chunk.numel(), generator=generator) * config.initializer_range)
    model.tie_weights()
    save_model(model, directory, max_shard_size="2GB", dtype=torch.bfloat16)
    del model
    gc.collect()
    return directory


def read_bandwidth(seconds: float = 3.0) -> float:
    """Read bandwidth (GB/s) over 1 GiB, all threads: the better of torch's fp32 matrix-vector product and a
    plain AVX2 streaming sum (qwenlab's kernels), each the median of repeated runs."""
    from qwenlab.engine import kernels

    matrix = torch.ones(2**28 // 4096, 4096)
    vector = torch.ones(4096)
    probes = {"torch.mv": lambda: torch.mv(matrix, vector)}
    module = kernels.load()
    if module is not None:
        probes["stream sum"] = lambda: module.read_sum(matrix)
    best = 0.0
    for probe in probes.values():
        probe()
        rates, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(rates) < 5:
            start = time.perf_counter()
            probe()
            rates.append(matrix.numel() * 4 / (time.perf_counter() - start) / 1e9)
        best = max(best, statistics.median(rates))
    del matrix
    return best


def decode_bytes_per_token(config, dtype_bytes: int = 2, context: int = 0) -> int:
    """Bytes a batch-1 decode step reads: every weight it uses once (active experts only), the LM head, KV."""
    counts = config.param_counts()
    embedding_rows = config.vocab_size * config.hidden_size
    weights = counts["active"] - embedding_rows  # the input embedding reads one row, not the matrix
    if config.tie_word_embeddings:
        weights += embedding_rows  # ... but the tied LM head reads all of it
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context
    return (weights + kv) * dtype_bytes


def median_of(fn, runs: int) -> tuple[float, list[float]]:
    values = [fn() for _ in range(runs)]
    return statistics.median(values), values


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_avg": os.getloadavg(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def peak_rss_bytes() -> int:
    """Peak resident set (VmHWM) of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ---- qwenlab engine timings ----------------------------------------------------------------------------
def engine_decode_rate(engine, prompt_len: int, new_tokens: int) -> float:
    """Batch-1 decode tokens/s: the steps after the prefill, one request."""
    from qwenlab.engine import SamplingParams

    engine.add_request("bench", list(range(1000, 1000 + prompt_len)),
                       SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True))
    engine.step()  # prefill (+ first token)
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps / (time.perf_counter() - start)


# ---- transformers baseline ----------------------------------------------------------------------------
def load_transformers(directory: Path, experts_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, **kwargs).eval()


def transformers_decode_rate(model, prompt_len: int, new_tokens: int) -> float:
    """transformers' greedy generate: (tokens after the first) / (time of generate(n+1) - generate(1))."""
    ids = torch.arange(1000, 1000 + prompt_len)[None]
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return time.perf_counter() - start

    timed(2)
    return new_tokens / max(timed(new_tokens + 1) - timed(1), 1e-9)
