"""Plot the engine benchmark results (bench/results/{decode,batch,prefill,moe_decode}.json) into docs/.

    .venv/bin/python bench/plot_engine.py        # writes docs/engine_benchmarks.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def bars(ax, labels, series: dict, title: str, ylabel: str) -> None:
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        drawn = ax.bar(xs, [v or 0 for v in values], width, label=name)
        ax.bar_label(drawn, labels=[f"{v:.1f}" if v else "" for v in values], fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def main() -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    decode = load("decode")
    if decode:
        shapes = decode["shapes"]
        bars(axes[0][0], [s["shape"] for s in shapes],
             {"qwenlab": [s["qwenlab_tok_s"] for s in shapes],
              "transformers": [s["transformers_tok_s"] for s in shapes],
              "bandwidth roofline": [s["roofline_tok_s"] for s in shapes]},
             "batch-1 bf16 decode", "tokens/s")
    batch = load("batch")
    if batch:
        bars(axes[0][1], ["batch-1", f"{batch['args']['requests']} concurrent"],
             {"qwenlab": [batch["batch1_tok_s"], batch["aggregate_tok_s"]],
              "transformers": [None, batch["transformers_aggregate_tok_s"]]},
             "continuous batching (aggregate output)", "tokens/s")
    prefill = load("prefill")
    if prefill:
        shapes = prefill["shapes"]
        bars(axes[1][0], [s["shape"] for s in shapes],
             {"qwenlab": [s["qwenlab_tok_s"] for s in shapes],
              "transformers": [s["transformers_tok_s"] for s in shapes]},
             f"{prefill['args']['tokens']}-token prefill", "prompt tokens/s")
    moe = load("moe_decode")
    if moe:
        names = ["qwenlab"] + [f"transformers\n{k}" for k in moe["transformers_tok_s"]] + ["roofline"]
        values = [moe["qwenlab_tok_s"]] + list(moe["transformers_tok_s"].values()) + [moe["roofline_tok_s"]]
        ax = axes[1][1]
        drawn = ax.bar(range(len(values)), values, color=["C0"] + ["C1"] * (len(values) - 2) + ["C2"])
        ax.bar_label(drawn, labels=[f"{v:.1f}" for v in values], fontsize=7)
        ax.set_xticks(range(len(values)), names, fontsize=7)
        ax.set_title(f"MoE batch-1 decode ({moe['args']['shape']})", fontsize=10)
        ax.set_ylabel("tokens/s")
    load_avg = (decode or batch or prefill or moe or {}).get("machine", {}).get("load_avg", [0])[0]
    fig.suptitle(f"qwenlab engine vs transformers, bf16, 2-core AMD EPYC (shared machine, load avg ~{load_avg:.0f})")
    fig.tight_layout()
    out = REPO / "docs" / "engine_benchmarks.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
