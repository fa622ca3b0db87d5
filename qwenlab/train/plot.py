"""Loss curves of a run (every stage, train and held-out) as a PNG: ``qwenlab plot RUN_DIR``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TrainingError


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise TrainingError(f"{run_dir}: no log.jsonl (not a training run directory?)")
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    stages = list(dict.fromkeys(r["stage"] for r in train))
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, stage in enumerate(stages):
        rows = [r for r in train if r["stage"] == stage]
        color = colors[i % len(colors)]
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r["loss"] for r in rows], color=color, lw=1.2, label=f"{stage} (train)")
        held = [r for r in evals if r["stage"] == stage]
        if held:
            ax_loss.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "o--", color=color, ms=4,
                         label=f"{stage} (held-out)")
        ax_lr.plot(steps, [r["lr"] for r in rows], color=color, lw=1.2)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title(f"{Path(run_dir).name}: loss by stage")
    ax_loss.grid(alpha=0.3)
    if stages:
        ax_loss.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
