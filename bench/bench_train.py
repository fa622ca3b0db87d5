"""Training throughput: qwenlab's training step vs a plain transformers training step, same model, same batch.

For a small dense (Qwen3) and a small MoE (Qwen3-MoE) model, both libraries start from the same random
checkpoint (written by qwenlab, loaded by transformers' ``from_pretrained``) and train on the same rows of
token ids with the same AdamW. One step = forward, loss, backward, gradient clipping, optimizer step:

* qwenlab: ``qwenlab.train.trainer.training_step`` with the trainer's optimizer (``build_optimizer``: fused
  AdamW) -- exactly what ``qwenlab train`` runs each step: packed-row attention context (on CPU in float32
  the trainer's blocked causal attention, ``qwenlab.model.fused.blocked_attention``), CE on the target
  positions only, Qwen's global-batch balancing loss for MoE, recipe defaults otherwise (no compile, no
  activation checkpointing); ``--compile`` adds the recipe's ``compile = true`` (torch.compile per decoder
  layer).
* transformers: ``model(input_ids, labels=input_ids, output_router_logits=moe).loss.backward()``,
  ``clip_grad_norm_``, ``torch.optim.AdamW`` with its defaults (its default experts implementation for
  MoE). ``--same-optimizer`` gives transformers the fused AdamW too, to separate the optimizer's share.

Two workloads: ``pretrain`` (every token is a target) and ``sft`` (the first ``--prompt-fraction`` of each
row is prompt, with no loss: qwenlab computes the LM head only where there is a target, transformers on
every position). The two alternate step by step; each figure is the median over ``--repeats`` steps after
``--warmup``,
in wall time and in CPU time of the process (all threads): on a machine shared with other jobs the CPU
time is the steadier of the two. Minor page faults per step are reported too (fresh large temporaries are
page-faulted in by the kernel on every step, which shows up as system time).
The first step's losses are printed side by side (they must agree: same weights, same batch). MFU uses
qwenlab's FLOP count (6 x active matmul parameters + attention, every token, as MFU conventionally
does) and, on CPU, the best fp32 matmul rate measured at several points of the run as the peak (``--peak-tflops`` to override); tokens/s ratios are what the goals are about.

    .venv/bin/python bench/bench_train.py --repeats 9 --out bench/results/train.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwenlab.checkpoint import init_checkpoint, load_model  # noqa: E402
from qwenlab.config import preset  # noqa: E402
from qwenlab.train import distributed as D  # noqa: E402
from qwenlab.train.data import Rows  # noqa: E402
from qwenlab.train.recipes import MoEConfig  # noqa: E402
from qwenlab.train.recipes import OptimConfig  # noqa: E402
from qwenlab.train.trainer import build_optimizer, flops_per_token, measured_matmul_flops, training_step  # noqa: E402

SPECIAL_IDS = dict(bos_token_id=8190, eos_token_id=8191)  # inside the small vocabulary
MODELS = {
    "dense (qwen3, 4 layers, H=256)": ("qwen3-0.6b", dict(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, rope_theta=1e6, tie_word_embeddings=True, **SPECIAL_IDS)),
    "MoE (qwen3_moe, 4 layers, 16 experts top-4)": ("qwen3-30b-a3b", dict(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
        norm_topk_prob=True, rope_theta=1e6, **SPECIAL_IDS)),
}


def make_batch(batch: int, seq: int, vocab: int, prompt: int = 0, seed: int = 0) -> tuple[Rows, torch.Tensor, torch.Tensor]:
    """The same batch for both libraries: qwenlab Rows, and transformers (input_ids, labels). The first
    ``prompt`` tokens of each row are context only (SFT: no loss on the prompt)."""
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq))
    labels = np.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[:, :prompt] = -100
    hf_labels = torch.from_numpy(ids.copy())
    hf_labels[:, :prompt + 1] = -100  # transformers shifts labels by one inside the loss
    rows = Rows(ids, labels, np.tile(np.arange(seq), (batch, 1)), np.zeros_like(ids), np.ones_like(ids, dtype=bool))
    return rows, torch.from_numpy(ids), hf_labels


def hf_adamw(model, fused: bool):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **({"fused": True} if fused else {}))


def bench_model(name: str, preset_name: str, overrides: dict, workload: str, args, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    config = preset(preset_name, **overrides)
    path = init_checkpoint(config, workdir / preset_name, seed=0, dtype="float32")
    ours = load_model(path, dtype=torch.float32).train()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    moe = config.is_moe
    prompt = int(args.seq_len * args.prompt_fraction) if workload == "sft" else 0
    rows, ids, hf_labels = make_batch(args.batch, args.seq_len, config.vocab_size, prompt)
    info = D.DistInfo()
    ours_opt = build_optimizer(ours, OptimConfig(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999)))
    hf_opt = hf_adamw(hf, args.same_optimizer)
    if args.compile:
        D.apply_compile(ours)
    moe_cfg = MoEConfig(balance="global")

    def ours_step():
        return training_step(ours, ours_opt, rows, moe_cfg, 1.0, args.batch, info, contextlib.nullcontext)["loss"]

    def hf_step():
        out = hf(ids, labels=hf_labels, **({"output_router_logits": True} if moe else {}))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    first = (ours_step(), hf_step())
    times = {"qwenlab": [], "transformers": []}
    cpu = {"qwenlab": [], "transformers": []}
    faults = {"qwenlab": [], "transformers": []}
    for i in range(args.warmup + args.repeats):
        for label, fn in (("qwenlab", ours_step), ("transformers", hf_step))[:: 1 if i % 2 == 0 else -1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            if i >= args.warmup:
                times[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
                faults[label].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    tokens = args.batch * args.seq_len
    fpt = flops_per_token(config, args.seq_len)
    result = {"model": name, "workload": workload, "flops_per_token": fpt, "params_total": config.param_counts()["total"],
              "params_active": config.param_counts()["active"], "tokens_per_step": tokens,
              "first_step_loss": {"qwenlab": first[0], "transformers": first[1]}}
    for label, values in times.items():
        median = statistics.median(values)
        result[label] = {"median_step_s": median, "median_step_cpu_s": statistics.median(cpu[label]),
                         "median_minor_page_faults": statistics.median(faults[label]),
                         "tokens_per_s": tokens / median,
                         "steps_s": values, "steps_cpu_s": cpu[label]}
    result["speedup"] = result["transformers"]["median_step_s"] / result["qwenlab"]["median_step_s"]
    result["speedup_cpu_time"] = result["transformers"]["median_step_cpu_s"] / result["qwenlab"]["median_step_cpu_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine multi-threaded timings mostly measure "
                             "contention)")
    parser.add_argument("--workloads", default="pretrain,sft", help="pretrain (loss on every token) and/or sft "
                                                                    "(loss on the last 1 - --prompt-fraction)")
    parser.add_argument("--prompt-fraction", type=float, default=0.75)
    parser.add_argument("--same-optimizer", action="store_true", help="fused AdamW for transformers too")
    parser.add_argument("--compile", action="store_true", help="torch.compile qwenlab's decoder layers")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--only", choices=["dense", "moe"], default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peaks = [args.peak_tflops * 1e12 if args.peak_tflops else measured_matmul_flops(torch.float32, 1024, 1.0)]
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x {args.seq_len} tokens")
    print(f"qwenlab: training_step, fused AdamW with clipping folded in, compile {'on' if args.compile else 'off'}; "
          f"transformers: defaults, {'fused' if args.same_optimizer else 'default'} AdamW")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads.split(","):
            for name, (preset_name, overrides) in MODELS.items():
                if args.only and (args.only == "moe") != ("MoE" in name):
                    continue
                results.append(bench_model(name, preset_name, overrides, workload, args, Path(tmp)))
                if not args.peak_tflops:  # re-measured between models: the best rate seen is the peak
                    peaks.append(measured_matmul_flops(torch.float32, 1024, 1.0))
                r = results[-1]
                print(f"  {workload} {name}: first-step loss qwenlab {r['first_step_loss']['qwenlab']:.6f}, "
                      f"transformers {r['first_step_loss']['transformers']:.6f}")
    args.peak = max(peaks)
    for r in results:
        for label in ("qwenlab", "transformers"):
            r[label]["mfu"] = r["flops_per_token"] * r[label]["tokens_per_s"] / args.peak
    print(f"\npeak for MFU: {args.peak / 1e9:.1f} GFLOP/s (best fp32 1024x1024 matmul rate measured during the run)")
    print("| workload | model | qwenlab tokens/s | transformers tokens/s | speedup (wall) | speedup (CPU time) "
          "| qwenlab MFU | transformers MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workload']} | {r['model']} | {r['qwenlab']['tokens_per_s']:,.0f} | "
              f"{r['transformers']['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {r['speedup_cpu_time']:.2f}x | "
              f"{r['qwenlab']['mfu']:.1%} | {r['transformers']['mfu']:.1%} |")
    print("\nmedian CPU seconds and minor page faults per step (qwenlab / transformers):")
    for r in results:
        print(f"  {r['workload']} {r['model']}: {r['qwenlab']['median_step_cpu_s']:.3f} s / "
              f"{r['transformers']['median_step_cpu_s']:.3f} s; {r['qwenlab']['median_minor_page_faults']:,.0f} / "
              f"{r['transformers']['median_minor_page_faults']:,.0f} faults")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "results": results},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
