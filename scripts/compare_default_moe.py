"""Dense or MoE for the default model? Train both on the same budget and compare held-out losses.

Takes recipes/default.toml's model and its two pretraining stages (prose, code) and runs them twice from
scratch, in this process, one after the other:

* dense: the recipe's model (Qwen3, 4 layers, hidden 256, SwiGLU width 768);
* MoE: the same attention and embeddings with Qwen3-MoE blocks of the same *active* width: 8 experts of
  width 384, 2 routed per token (768 active), global-batch load balancing (coefficient 0.01).

Same data order, steps, batch and schedule. Prints (and writes as JSON) each stage's held-out loss, the
wall time and tokens/s, and the total / active parameters.

    .venv/bin/python scripts/compare_default_moe.py --steps 150 --out docs/default-model-moe.json
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(raw: dict, name: str, out: Path) -> dict:
    from qwenlab.train.recipes import recipe_from_dict
    from qwenlab.train.trainer import train

    raw = {**raw, "run": {**raw["run"], "out": str(out / name), "save_every": 0}}
    start = time.perf_counter()
    train(recipe_from_dict(raw, where=name))
    seconds = time.perf_counter() - start
    log = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
    evals = {r["stage"]: r["eval_loss"] for r in log if r.get("kind") == "eval"}
    tokens = sum(r.get("tokens", 0) for r in log if r.get("kind") == "train")
    first = next(r for r in log if r.get("kind") == "train")
    return {"held_out_loss": evals, "seconds": round(seconds, 1), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "first_loss": first["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "default.toml"))
    p.add_argument("--steps", type=int, default=150, help="steps per pretraining stage")
    p.add_argument("--work", default=str(ROOT / "runs" / "default-moe-compare"))
    p.add_argument("--out", default=None, help="JSON results (merged into an existing file)")
    p.add_argument("--only", choices=("dense", "moe"), default=None, help="run one of the two")
    args = p.parse_args()
    import torch

    from qwenlab.config import ModelConfig, preset

    base = tomllib.loads(Path(args.recipe).read_text())
    base["stages"] = [dict(s, steps=args.steps) for s in base["stages"][:2]]
    moe = json.loads(json.dumps(base))
    moe["model"]["preset"] = "qwen3-30b-a3b"
    moe["model"]["overrides"].update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=384,
                                     norm_topk_prob=True, decoder_sparse_step=1)
    moe["moe"] = {"balance": "global", "aux_coef": 0.01}
    results = {}
    if args.out and Path(args.out).is_file():
        results = json.loads(Path(args.out).read_text())["results"]
    for name, raw in (("dense", base), ("moe", moe)):
        if args.only not in (None, name):
            continue
        config: ModelConfig = preset(raw["model"]["preset"], **raw["model"]["overrides"])
        counts = config.param_counts()
        total, active = counts["total"], counts["active"]
        torch.manual_seed(0)
        results[name] = {"parameters": total, "active_parameters": active, **run(raw, name, Path(args.work))}
        print(name, json.dumps(results[name]), flush=True)
    if len(results) < 2:
        return
    print(f"\n{'model':6} {'params':>8} {'active':>8} " + " ".join(f"{s:>10}" for s in results["dense"]["held_out_loss"])
          + f" {'seconds':>8} {'tok/s':>7}")
    for name, r in results.items():
        print(f"{name:6} {r['parameters'] / 1e6:7.2f}M {r['active_parameters'] / 1e6:7.2f}M "
              + " ".join(f"{v:10.3f}" for v in r["held_out_loss"].values())
              + f" {r['seconds']:8.0f} {r['tokens_per_s']:7.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": args.steps, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
