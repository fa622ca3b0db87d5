"""Forward throughput of a Qwen3-30B-A3B-shaped MoE stack: qwenlab vs transformers' experts implementations.

Real widths (hidden 2048, 32 query / 4 KV heads, head_dim 128, 128 experts of width 768, top-8, renormalised),
fewer layers so that both models fit in memory side by side; a small vocabulary so the LM head does not
hide the MoE cost. Both libraries load the same bf16 checkpoint. For each workload it reports medians of
``--repeats`` timed runs after a warm-up, tokens/s and the ratio to each transformers implementation. It
also measures the peak RSS of loading the checkpoint in a fresh process (VmHWM) for both libraries.

    .venv/bin/python bench/bench_moe.py --layers 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwenlab.checkpoint import init_checkpoint, load_model  # noqa: E402
from qwenlab.config import preset  # noqa: E402

WORKLOADS = {  # name: (batch, tokens per sequence)
    "decode b=1": (1, 1),
    "decode b=8": (8, 1),
    "prefill 1x128": (1, 128),
    "prefill 1x512": (1, 512),
}

RSS_SCRIPT = """
import sys, psutil, torch
rss0 = psutil.Process().memory_info().rss
if sys.argv[1] == "qwenlab":
    import qwenlab
    qwenlab.load_model(sys.argv[2], dtype=torch.bfloat16, progress=False)
else:
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(rss0, peak)
"""


def interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) per function, run round-robin so that load from other
    processes on this shared machine falls on every engine alike."""
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s)) for name, s in samples.items()}


def load_peak(kind: str, directory: Path) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, kind, str(directory)], check=True, capture_output=True,
                         text=True).stdout.split()
    return int(out[0]), int(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "moe.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "bench_moe.png"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM
    from tqdm import tqdm

    torch.manual_seed(0)
    config = preset("qwen3-30b-a3b", num_hidden_layers=args.layers, vocab_size=args.vocab)
    tmp = Path(tempfile.mkdtemp(prefix="bench-moe-"))
    print(f"writing a {config.param_counts()['total'] / 1e9:.2f}B-parameter bf16 checkpoint to {tmp} ...", flush=True)
    init_checkpoint(config, tmp, dtype="bfloat16")
    size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))

    results: dict = {"config": {"layers": args.layers, "hidden": 2048, "experts": 128, "top_k": 8,
                                "moe_intermediate": 768, "vocab": args.vocab, "threads": torch.get_num_threads()},
                     "workloads": {}}
    inputs = {name: torch.randint(0, args.vocab, shape, generator=torch.Generator().manual_seed(1))
              for name, shape in WORKLOADS.items()}

    def measure(engines: dict) -> None:
        with torch.inference_mode():
            for name, ids in tqdm(inputs.items(), desc=", ".join(engines), leave=False):
                runnable = {}
                for engine, fn in engines.items():
                    try:
                        fn(ids)
                        runnable[engine] = (lambda f: lambda: f(ids))(fn)
                    except RuntimeError as exc:  # batched_mm gathers per-token weight copies: OOM on prefill
                        print(f"{engine} on {name}: failed ({str(exc).splitlines()[0][:80]})", flush=True)
                        results["workloads"].setdefault(name, {})[engine] = None
                for engine, (wall, cpu) in interleaved(runnable, args.repeats).items():
                    results["workloads"].setdefault(name, {})[engine] = ids.numel() / wall
                    results.setdefault("cpu_seconds", {}).setdefault(name, {})[engine] = cpu

    from qwenlab.engine.kernels import use_bf16_kernels

    ours = load_model(tmp, dtype=torch.bfloat16, progress=False)
    ours_kernels = load_model(tmp, dtype=torch.bfloat16, progress=False)
    use_bf16_kernels(ours_kernels)  # what the engine runs on CPU: AVX2 bf16 kernels
    default = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).eval()  # grouped_mm
    assert default.config._experts_implementation == "grouped_mm"
    measure({"qwenlab": ours, "qwenlab + CPU kernels": ours_kernels,
             "transformers grouped_mm": lambda ids: default(ids, use_cache=False).logits})
    del ours, default
    for impl in ("batched_mm", "eager"):  # the other implementations, one at a time (memory)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, experts_implementation=impl).eval()
        measure({f"transformers {impl}": lambda ids: hf(ids, use_cache=False).logits})
        del hf

    for kind in ("qwenlab", "transformers"):
        before, peak = load_peak(kind, tmp)
        results[f"load_peak_rss_{kind}"] = {"before": before, "peak": peak, "checkpoint_bytes": size,
                                            "growth_over_size": (peak - before) / size}

    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    plot(results, args.plot)
    print(f"\nwrote {args.out} and {args.plot}")


def print_table(results: dict) -> None:
    engines = list(next(iter(results["workloads"].values())))
    header = f"{'workload':16s}" + "".join(f"{e:>26s}" for e in engines) + f"{'best ours vs default':>22s}{'vs fastest HF':>15s}"
    print("\ntokens/s (median)\n" + header)
    for name, row in results["workloads"].items():
        hf = {k: v for k, v in row.items() if k.startswith("transformers") and v}
        line = f"{name:16s}" + "".join(f"{row[e]:26.1f}" if row[e] else f"{'failed':>26s}" for e in engines)
        best = max(v for k, v in row.items() if k.startswith("qwenlab") and v)
        line += f"{best / row['transformers grouped_mm']:21.2f}x{best / max(hf.values()):14.2f}x"
        print(line)
    print("\nprocess CPU seconds per forward (median; steadier than wall time on a shared machine)")
    for name, row in results.get("cpu_seconds", {}).items():
        print(f"{name:16s}" + "".join(f"{row.get(e, float('nan')):26.3f}" for e in engines))
    for kind in ("qwenlab", "transformers"):
        r = results[f"load_peak_rss_{kind}"]
        print(f"loading peak RSS growth, {kind}: {(r['peak'] - r['before']) / 2**30:.2f} GiB for a "
              f"{r['checkpoint_bytes'] / 2**30:.2f} GiB checkpoint ({r['growth_over_size']:.2f}x)")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["workloads"])
    engines = list(results["workloads"][names[0]])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        ax.bar([x + i * width for x in range(len(names))], [results["workloads"][n][engine] or 0 for n in names], width,
               label=engine)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log)")
    ax.set_title(f"Qwen3-30B-A3B-shaped MoE, {results['config']['layers']} layers, bf16, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
