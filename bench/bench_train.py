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

On a CUDA GPU (``--device cuda``; defaults there: ``--size gpu``, ``--dtype bfloat16``, batch 8 x 2048):

    python bench/bench_train.py --device cuda --workloads pretrain --precision autocast,pure \\
        --warmup 2 --repeats 8 --budget-s 150 --out bench/results/train_h200.json

* ``--size gpu``: a dense model shaped exactly like Qwen3-0.6B (28 layers, H 1024, I 3072, 16 heads / 8
  KV heads of 128, vocabulary 151,936, tied embeddings) and a Qwen3-30B-A3B-style MoE cut to 6 layers,
  H 1024 and a 32k vocabulary (16 heads / 4 KV heads of 128, 128 experts, top-8, moe_intermediate_size
  768, untied; 1.9B parameters, 0.21B active); ``--override key=value`` changes a field of every selected
  model (MoE-only fields skip the dense one). ``--size small`` = the CPU models above.
* precision: ``--dtype bfloat16`` with ``--precision autocast`` (default) is the trainer's
  ``mixed_precision = "bfloat16"`` with ``dtype = "float32"``: fp32 master weights, gradients and AdamW
  state, ``torch.autocast(bfloat16)`` around the forward only (backward outside), for both libraries.
  ``--precision pure`` is the trainer's ``dtype = "bfloat16"``: both libraries hold bf16 weights and AdamW
  state, no autocast. ``--precision autocast,pure`` runs both. ``--dtype float32``: fp32, no autocast
  (``--tf32`` allows TF32 matmuls; off by default, as in the trainer).
* timing: the two libraries run one after the other (not alternating: a dedicated GPU needs no
  interleaving, and only one model is resident at a time), every step bracketed by
  ``torch.cuda.synchronize()``; wall-time medians and their ratio (CPU time means nothing there); peak
  memory per library = ``torch.cuda.max_memory_allocated()`` over its load and steps (weights, gradients,
  AdamW state, activations), reset between libraries. MFU against ``--peak-tflops`` or 989 TFLOP/s (bf16
  dense, H100/H200 class). The random checkpoints are initialised on the GPU and written to /dev/shm when
  it has room. ``--hf-experts NAME`` picks transformers' experts implementation (``eager``, ``grouped_mm``,
  ``batched_mm``; default: transformers' own default, ``grouped_mm`` in 5.x; ``batched_mm`` gathers one
  weight matrix per token slot and does not fit in memory at ``--size gpu``). The expert matmul path each
  library actually took is printed. ``--budget-s`` trims the timed repeats (never below 3) so that the
  run stays within about that many seconds; a failure (e.g. out of memory) of one library is reported and
  the run goes on. ``--only``, ``--workloads``, ``--compile``, ``--same-optimizer`` work as on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwenlab.checkpoint import build_empty, init_checkpoint, load_model, save_model  # noqa: E402
from qwenlab.config import parse_override, preset  # noqa: E402
from qwenlab.model import fused  # noqa: E402
from qwenlab.model import moe as qwen_moe  # noqa: E402
from qwenlab.model.layers import RMSNorm  # noqa: E402
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
# --size gpu: the dense model is Qwen3-0.6B as published. The MoE keeps Qwen3-30B-A3B's experts (128, top-8,
# moe_intermediate_size 768) and attention shape (head_dim 128, 4 KV heads) with 6 layers, H 1024 (16 query
# heads) and a 32k vocabulary: with the full 151,936 the LM head would be ~40% of a 6-layer model's FLOPs (~10%
# in the real 48-layer model) and the comparison mostly one of LM heads. Experts are ~95% of the parameters.
GPU_MODELS = {
    "dense (qwen3-0.6b: 28 layers, H=1024)": ("qwen3-0.6b", dict(rope_theta=1e6)),
    "MoE (qwen3_moe, 6 layers, H=1024, 128 experts top-8, I=768)": ("qwen3-30b-a3b", dict(
        num_hidden_layers=6, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
        num_key_value_heads=4, head_dim=128, vocab_size=32768, bos_token_id=32766, eos_token_id=32767,
        rope_theta=1e6)),
}
MOE_ONLY_FIELDS = {"num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                   "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "shared_expert_intermediate_size"}
GPU_DEFAULT_PEAK_TFLOPS = 989.0  # bf16 dense, H100 / H200 SXM
PRECISION_LABELS = {"fp32": "float32", "autocast": "bf16 autocast, fp32 master weights",
                    "pure": "bf16 weights and AdamW state"}


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


def hf_train_step(model, optimizer, ids, labels, moe: bool, autocast):
    """transformers' plain training step: forward with labels (and router logits for MoE), backward, clip, AdamW."""
    def step():
        with autocast():
            out = model(ids, labels=labels, **({"output_router_logits": True} if moe else {}))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())
    return step


def precision_setup(precision: str, device: torch.device):
    """(parameter dtype, autocast context factory) of a precision policy, the same for both libraries."""
    if precision == "pure":
        return torch.bfloat16, contextlib.nullcontext
    if precision == "autocast":
        return torch.float32, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.float32, contextlib.nullcontext


def model_config(preset_name: str, overrides: dict, extra: dict):
    config = preset(preset_name, **overrides)
    if extra:
        config = config.replace(**{k: v for k, v in extra.items() if config.is_moe or k not in MOE_ONLY_FIELDS})
    return config


def bench_model(name: str, config, path: Path, workload: str, precision: str, args) -> dict:
    """CPU protocol: the two libraries alternate step by step; wall and process CPU time per step."""
    from transformers import AutoModelForCausalLM

    param_dtype, autocast = precision_setup(precision, torch.device("cpu"))
    ours = load_model(path, dtype=param_dtype).train()
    moe = config.is_moe
    hf_kwargs = {"experts_implementation": args.hf_experts} if moe and args.hf_experts else {}
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=param_dtype, **hf_kwargs).train()
    prompt = int(args.seq_len * args.prompt_fraction) if workload == "sft" else 0
    rows, ids, hf_labels = make_batch(args.batch, args.seq_len, config.vocab_size, prompt)
    info = D.DistInfo()
    ours_opt = build_optimizer(ours, OptimConfig(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999)))
    hf_opt = hf_adamw(hf, args.same_optimizer)
    if args.compile:
        D.apply_compile(ours)
    moe_cfg = MoEConfig(balance="global")

    def ours_step():
        return training_step(ours, ours_opt, rows, moe_cfg, 1.0, args.batch, info, autocast)["loss"]

    hf_step = hf_train_step(hf, hf_opt, ids, hf_labels, moe, autocast)

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
    if precision != "fp32":
        result["precision"] = precision
    for label, values in times.items():
        median = statistics.median(values)
        result[label] = {"median_step_s": median, "median_step_cpu_s": statistics.median(cpu[label]),
                         "median_minor_page_faults": statistics.median(faults[label]),
                         "tokens_per_s": tokens / median,
                         "steps_s": values, "steps_cpu_s": cpu[label]}
    result["speedup"] = result["transformers"]["median_step_s"] / result["qwenlab"]["median_step_s"]
    result["speedup_cpu_time"] = result["transformers"]["median_step_cpu_s"] / result["qwenlab"]["median_step_cpu_s"]
    return result


# ---- GPU protocol ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checkpoint_on_device(config, out: Path, device: torch.device, seed: int = 0) -> Path:
    """A random checkpoint like ``init_checkpoint`` (transformers' init scheme: N(0, initializer_range) for
    matrices, embeddings and experts, unit norms, zero biases), drawn on ``device`` (the CPU generator of
    ``init_weights`` takes tens of seconds for a few billion parameters), written in HF layout in float32."""
    model = build_empty(config, torch.float32, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    std, done = config.initializer_range, set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
                done.add(id(module.weight))
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                done.add(id(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                    done.add(id(module.bias))
            elif isinstance(module, qwen_moe.Experts):
                for param in (module.gate_up_proj, module.down_proj):
                    param.normal_(0.0, std, generator=generator)
                    done.add(id(param))
    model.tie_weights()
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise RuntimeError(f"checkpoint_on_device: parameters left uninitialised: {missed[:5]}")
    path = save_model(model, out, max_shard_size="2GB", dtype="float32")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return path


class ExpertsProbe:
    """Which expert matmul path a library takes, read off the first MoE experts module's first call."""

    def __init__(self, model, library: str):
        self.library, self.text, self.handle = library, None, None
        for module in model.modules():
            if (isinstance(module, qwen_moe.Experts) if library == "qwenlab"
                    else type(module).__name__.endswith("Experts") and hasattr(module, "gate_up_proj")):
                self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)
                break

    def _hook(self, module, args, kwargs):
        if self.text is not None:
            return
        x = args[0] if args else kwargs.get("hidden_states")
        w = module.gate_up_proj
        autocast = torch.is_autocast_enabled(x.device.type)
        where = (f"activations {str(x.dtype)[6:]}, expert weights {str(w.dtype)[6:]}"
                 f"{', autocast on' if autocast else ''}")
        if self.library == "qwenlab":
            if x.device.type == "cpu" and fused.wants_fused(x, w):
                path = "CPU experts Function (_ExpertsFFN: grouped matmuls)"
            elif qwen_moe._use_grouped_mm(x, w, 1):
                path = f"grouped_mm in {str(x.dtype)[6:]}"
            else:
                path = f"per-expert matmul loop in {str(x.dtype)[6:]} (grouped_mm needs bf16 activations on CUDA)"
        else:
            impl = getattr(module.config, "_experts_implementation", None)
            if impl == "grouped_mm":
                path = f"grouped_mm in {str(w.dtype)[6:]} (inputs cast to the weight dtype)"
                if x.device.type == "cuda" and w.dtype != torch.bfloat16:
                    path += "; torch runs non-bf16 grouped_mm on CUDA as a per-expert mm loop"
            elif impl in (None, "eager"):
                path = "eager per-expert F.linear loop" + (" (bf16 under autocast)" if autocast else "")
            else:
                path = str(impl)
        self.text = f"{path} [{where}]"

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def run_library(label: str, build, args, device: torch.device, state: dict, tokens: int) -> dict:
    """Load, one untimed step, warmup, timed repeats, all bracketed by synchronize; then free everything."""
    step = probe = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step, probe, extra = build()
        sync(device)
        start = time.perf_counter()
        first = step()
        sync(device)
        first_s = time.perf_counter() - start
        warm = []
        for _ in range(args.warmup):
            start = time.perf_counter()
            step()
            sync(device)
            warm.append(time.perf_counter() - start)
        per_step = statistics.median(warm) if warm else first_s
        repeats = args.repeats
        runs_left = max(1, state["runs_left"])
        if args.budget_s:
            allowance = (args.budget_s - (time.perf_counter() - state["t0"])) / runs_left
            repeats = max(min(3, args.repeats), min(args.repeats, int(allowance / per_step)))
        print(f"    [{time.perf_counter() - state['t0']:5.0f} s] {label}: first step {first_s:.2f} s, "
              f"warm {per_step:.3f} s/step; timing {repeats} steps (~{repeats * per_step:.0f} s)", flush=True)
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        out = {"first_step_loss": first, "first_step_s": first_s, "warmup_steps_s": warm, "median_step_s": median,
               "tokens_per_s": tokens / median, "steps_s": times, "timed_steps": repeats, **extra}
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        if probe is not None and probe.text:
            out["experts_path"] = probe.text
        return out
    except Exception as error:  # noqa: BLE001 -- report (e.g. out of memory) and go on with the next run
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]
        print(f"    [{time.perf_counter() - state['t0']:5.0f} s] {label}: FAILED {message}", flush=True)
        return {"error": message}
    finally:
        if probe is not None:
            probe.remove()
        step = probe = None
        state["runs_left"] -= 1
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_model_gpu(name: str, config, path: Path, workload: str, precision: str, args, device: torch.device,
                    state: dict) -> dict:
    """GPU protocol: qwenlab, then transformers, one resident at a time; wall medians, peak memory."""
    from transformers import AutoModelForCausalLM

    param_dtype, autocast = precision_setup(precision, device)
    moe = config.is_moe
    prompt = int(args.seq_len * args.prompt_fraction) if workload == "sft" else 0
    rows, ids, hf_labels = make_batch(args.batch, args.seq_len, config.vocab_size, prompt)
    ids, hf_labels = ids.to(device), hf_labels.to(device)
    tokens = args.batch * args.seq_len
    fpt = flops_per_token(config, args.seq_len)

    def build_qwenlab():
        model = load_model(path, dtype=param_dtype, device=device, progress=False).train()
        optimizer = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999)))
        if args.compile:
            D.apply_compile(model)
        info, moe_cfg = D.DistInfo(device=device), MoEConfig(balance="global")

        def step():
            return training_step(model, optimizer, rows, moe_cfg, 1.0, args.batch, info, autocast)["loss"]

        return step, (None if args.compile or not moe else ExpertsProbe(model, "qwenlab")), {}

    def build_transformers():
        kwargs = {"experts_implementation": args.hf_experts} if moe and args.hf_experts else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=param_dtype, **kwargs).to(device).train()
        optimizer = hf_adamw(model, args.same_optimizer)
        extra = {"attn_implementation": getattr(model.config, "_attn_implementation", None)}
        if moe:
            extra["experts_implementation"] = getattr(model.config, "_experts_implementation", None)

        step = hf_train_step(model, optimizer, ids, hf_labels, moe, autocast)
        return step, (ExpertsProbe(model, "transformers") if moe else None), extra

    result = {"model": name, "workload": workload, "precision": precision, "flops_per_token": fpt,
              "params_total": config.param_counts()["total"], "params_active": config.param_counts()["active"],
              "tokens_per_step": tokens}
    result["qwenlab"] = run_library("qwenlab", build_qwenlab, args, device, state, tokens)
    result["transformers"] = run_library("transformers", build_transformers, args, device, state, tokens)
    result["first_step_loss"] = {label: result[label].get("first_step_loss") for label in ("qwenlab", "transformers")}
    ok = all("error" not in result[label] for label in ("qwenlab", "transformers"))
    result["speedup"] = (result["transformers"]["median_step_s"] / result["qwenlab"]["median_step_s"]) if ok else None
    for label in ("qwenlab", "transformers"):
        if "tokens_per_s" in result[label]:
            result[label]["mfu"] = fpt * result[label]["tokens_per_s"] / args.peak
    return result


def _fmt(value, spec: str, missing: str = "failed") -> str:
    return missing if value is None else format(value, spec)


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.1f}"


def report_gpu(results: list[dict], args, device: torch.device) -> None:
    print(f"\npeak for MFU: {args.peak / 1e12:.0f} TFLOP/s"
          + ("" if args.peak_tflops else " (bf16 dense peak of the H100/H200 class; --peak-tflops to override)"))
    print("| workload | model | precision | qwenlab tokens/s | transformers tokens/s | speedup (wall) | qwenlab MFU "
          "| transformers MFU | qwenlab peak GiB | transformers peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        q, t = r["qwenlab"], r["transformers"]
        print(f"| {r['workload']} | {r['model']} | {r['precision']} | {_fmt(q.get('tokens_per_s'), ',.0f')} | "
              f"{_fmt(t.get('tokens_per_s'), ',.0f')} | {_fmt(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} | "
              f"{_fmt(q.get('mfu'), '.1%')} | {_fmt(t.get('mfu'), '.1%')} | {_gib(q.get('peak_memory_bytes'))} | "
              f"{_gib(t.get('peak_memory_bytes'))} |")
    print("\nmedian wall seconds per step (qwenlab / transformers), timed steps, first-step losses:")
    for r in results:
        q, t = r["qwenlab"], r["transformers"]
        print(f"  {r['workload']} {r['precision']} {r['model']}: {_fmt(q.get('median_step_s'), '.4f')} / "
              f"{_fmt(t.get('median_step_s'), '.4f')} s; {q.get('timed_steps', 0)} / {t.get('timed_steps', 0)} steps; "
              f"loss {_fmt(q.get('first_step_loss'), '.5f')} / {_fmt(t.get('first_step_loss'), '.5f')}")
        for label in ("qwenlab", "transformers"):
            if r[label].get("experts_path"):
                print(f"    {label} experts: {r[label]['experts_path']}")
            if r[label].get("error"):
                print(f"    {label} error: {r[label]['error']}")


def write_json(path, args, results) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "results": results},
                                         indent=2) + "\n")


def scratch_dir(gpu_protocol: bool, configs) -> str | None:
    """/dev/shm for the GPU protocol's (large) checkpoints when it has room for them, else the default."""
    if not gpu_protocol or not os.path.isdir("/dev/shm"):
        return None
    need = sum(4 * c.param_counts()["total"] for c in configs) * 1.2 + (1 << 30)
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > need else None
    except OSError:
        return None


def estimate_s(configs: list, args, precisions: list[str], workloads: list[str]) -> float:
    """A rough wall time for the GPU protocol: the steps at an assumed rate plus model setup."""
    steps = 2 * (1 + args.warmup + args.repeats)
    total = 0.0
    for config in configs:
        flops = flops_per_token(config, args.seq_len) * args.batch * args.seq_len
        for precision in precisions:
            rate = {"pure": 0.30, "autocast": 0.12, "fp32": 0.04}[precision] * GPU_DEFAULT_PEAK_TFLOPS * 1e12
            total += len(workloads) * (steps * flops / rate + 2 * (3 + config.param_counts()["total"] / 4e8))
        total += config.param_counts()["total"] / 5e8  # checkpoint init + write
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=["small", "gpu"], default=None,
                        help="small: the CPU models; gpu: Qwen3-0.6B and a 4-layer Qwen3-30B-A3B-style MoE "
                             "(default: small on cpu, gpu on cuda)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="change a config field of every selected model (MoE-only fields skip the dense one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--precision", default="autocast",
                        help="with --dtype bfloat16: autocast (fp32 master weights, bf16 autocast forward: the "
                             "trainer's mixed_precision = 'bfloat16'), pure (bf16 weights and AdamW state: the "
                             "trainer's dtype = 'bfloat16'), or both, comma-separated")
    parser.add_argument("--hf-experts", default=None, metavar="NAME",
                        help="transformers' experts_implementation for MoE (eager, grouped_mm, batched_mm, ...; "
                             "default: transformers' own default)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (both libraries)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="GPU protocol: trim the timed repeats (never below 3) to stay within about this "
                             "many seconds in all")
    parser.add_argument("--gpu-protocol", action="store_true", help=argparse.SUPPRESS)  # the cuda protocol on cpu
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: 4 small, 8 gpu)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: 256 small, 2048 gpu)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default on cpu 1: on a shared machine multi-threaded timings mostly "
                             "measure contention; on cuda torch's default)")
    parser.add_argument("--workloads", default="pretrain,sft", help="pretrain (loss on every token) and/or sft "
                                                                    "(loss on the last 1 - --prompt-fraction)")
    parser.add_argument("--prompt-fraction", type=float, default=0.75)
    parser.add_argument("--same-optimizer", action="store_true", help="fused AdamW for transformers too")
    parser.add_argument("--compile", action="store_true", help="torch.compile qwenlab's decoder layers")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--only", choices=["dense", "moe"], default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--plot", default=None, help="bar chart of the CPU results (PNG; default "
                        "docs/bench_train.png when every model and workload runs, '' for none)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    device = torch.device(args.device)
    gpu = args.device == "cuda" or args.gpu_protocol
    args.size = args.size or ("gpu" if args.device == "cuda" else "small")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.batch = args.batch or (8 if args.size == "gpu" else 4)
    args.seq_len = args.seq_len or (2048 if args.size == "gpu" else 256)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    precisions = ["fp32"]
    if args.dtype == "bfloat16":
        precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
        bad = [p for p in precisions if p not in ("autocast", "pure")]
        if bad or not precisions:
            parser.error(f"--precision: autocast and/or pure, got {args.precision!r}")
    extra = dict(parse_override(text) for text in args.override)
    workloads = args.workloads.split(",")
    models = [(name, preset_name, overrides) for name, (preset_name, overrides)
              in (GPU_MODELS if args.size == "gpu" else MODELS).items()
              if not args.only or (args.only == "moe") == ("MoE" in name)]
    configs = {name: model_config(preset_name, overrides, extra) for name, preset_name, overrides in models}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    import transformers

    if gpu:
        args.peak = (args.peak_tflops or GPU_DEFAULT_PEAK_TFLOPS) * 1e12
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            where = (f"{torch.cuda.get_device_name(device)} (capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB)")
            transformers.utils.logging.disable_progress_bar()
        else:
            where = "cpu (GPU protocol: no synchronize, no memory figures)"
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, {where}, batch {args.batch} x "
              f"{args.seq_len} tokens, first step + {args.warmup} warmup + {args.repeats} timed steps per library")
        print("precision (both libraries): " + "; ".join(
            {"fp32": f"float32 weights, AdamW state and compute, TF32 {'on' if args.tf32 else 'off'}",
             "autocast": "bf16 autocast around the forward, backward outside it, fp32 master weights, gradients "
                         "and AdamW state (the trainer's mixed_precision = 'bfloat16', dtype = 'float32')",
             "pure": "bf16 weights, gradients and AdamW state, no autocast (the trainer's dtype = 'bfloat16')"}[p]
            for p in precisions))
        print(f"qwenlab: training_step (sdpa attention through the trainer's DocumentAttention: the blocked CPU "
              f"attention is CPU float32 only), fused AdamW with clipping folded in, compile "
              f"{'on' if args.compile else 'off'}; transformers: defaults (experts implementation "
              f"{args.hf_experts or 'transformers default'}), {'fused' if args.same_optimizer else 'default'} AdamW")
        print("timing: qwenlab then transformers (one model resident at a time), each step between "
              "torch.cuda.synchronize() calls; medians of wall time; peak memory = torch.cuda.max_memory_allocated "
              "over each library's load and steps")
        for name, config in configs.items():
            counts = config.param_counts()
            print(f"  {name}: {config.num_hidden_layers} layers, H {config.hidden_size}, heads "
                  f"{config.num_attention_heads}/{config.num_key_value_heads} x {config.head_dim}, vocab "
                  f"{config.vocab_size}"
                  + (f", {config.num_experts} experts top-{config.num_experts_per_tok} I {config.moe_intermediate_size}"
                     if config.is_moe else f", I {config.intermediate_size}")
                  + f"; {counts['total'] / 1e9:.2f}B parameters ({counts['active'] / 1e9:.2f}B active), "
                    f"{flops_per_token(config, args.seq_len) / 1e9:.2f} GFLOP/token")
        print(f"rough estimate: ~{estimate_s(list(configs.values()), args, precisions, workloads):.0f} s "
              f"(assumed rates; each library's measured step time is printed as it runs)"
              + (f"; --budget-s {args.budget_s:.0f}" if args.budget_s else ""), flush=True)
    else:
        peaks = [args.peak_tflops * 1e12 if args.peak_tflops else measured_matmul_flops(torch.float32, 1024, 1.0)]
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
              f"batch {args.batch} x {args.seq_len} tokens")
        print(f"qwenlab: training_step, fused AdamW with clipping folded in, compile {'on' if args.compile else 'off'}; "
              f"transformers: defaults, {'fused' if args.same_optimizer else 'default'} AdamW")
        if precisions != ["fp32"] or extra or args.hf_experts or args.size != "small":
            print(f"precision {', '.join(PRECISION_LABELS[p] for p in precisions)}; size {args.size}"
                  + (f", overrides {extra}" if extra else "")
                  + (f"; transformers experts implementation {args.hf_experts}" if args.hf_experts else ""))
    results = []
    state = {"t0": time.perf_counter(), "runs_left": 2 * len(workloads) * len(models) * len(precisions)}
    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=scratch_dir(gpu, configs.values())) as tmp:
        for workload in workloads:
            for name, preset_name, overrides in models:
                config = configs[name]
                if name not in paths:
                    out = Path(tmp) / f"{preset_name}-{len(paths)}"
                    paths[name] = (checkpoint_on_device(config, out, device) if gpu
                                   else init_checkpoint(config, out, seed=0, dtype="float32"))
                for precision in precisions:
                    if gpu:
                        print(f"  [{time.perf_counter() - state['t0']:5.0f} s] {workload} {precision} {name}",
                              flush=True)
                        results.append(bench_model_gpu(name, config, paths[name], workload, precision, args, device,
                                                       state))
                        r = results[-1]
                        print(f"    => {_fmt(r['qwenlab'].get('tokens_per_s'), ',.0f')} vs "
                              f"{_fmt(r['transformers'].get('tokens_per_s'), ',.0f')} tokens/s, speedup "
                              f"{_fmt(r['speedup'], '.2f')}; first-step loss "
                              f"{_fmt(r['first_step_loss']['qwenlab'], '.5f')} / "
                              f"{_fmt(r['first_step_loss']['transformers'], '.5f')}", flush=True)
                        write_json(args.out, args, results)  # partial results survive a run cut short
                        continue
                    results.append(bench_model(name, config, paths[name], workload, precision, args))
                    if not args.peak_tflops:  # re-measured between models: the best rate seen is the peak
                        peaks.append(measured_matmul_flops(torch.float32, 1024, 1.0))
                    r = results[-1]
                    label = workload if precision == "fp32" else f"{workload} ({precision})"
                    print(f"  {label} {name}: first-step loss qwenlab {r['first_step_loss']['qwenlab']:.6f}, "
                          f"transformers {r['first_step_loss']['transformers']:.6f}")
    if gpu:
        report_gpu(results, args, device)
        write_json(args.out, args, results)
        return
    args.peak = max(peaks)
    for r in results:
        for label in ("qwenlab", "transformers"):
            r[label]["mfu"] = r["flops_per_token"] * r[label]["tokens_per_s"] / args.peak
    print(f"\npeak for MFU: {args.peak / 1e9:.1f} GFLOP/s (best fp32 1024x1024 matmul rate measured during the run)")
    print("| workload | model | qwenlab tokens/s | transformers tokens/s | speedup (wall) | speedup (CPU time) "
          "| qwenlab MFU | transformers MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        workload = r["workload"] if "precision" not in r else f"{r['workload']} ({r['precision']})"
        print(f"| {workload} | {r['model']} | {r['qwenlab']['tokens_per_s']:,.0f} | "
              f"{r['transformers']['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {r['speedup_cpu_time']:.2f}x | "
              f"{r['qwenlab']['mfu']:.1%} | {r['transformers']['mfu']:.1%} |")
    print("\nmedian CPU seconds and minor page faults per step (qwenlab / transformers):")
    for r in results:
        workload = r["workload"] if "precision" not in r else f"{r['workload']} ({r['precision']})"
        print(f"  {workload} {r['model']}: {r['qwenlab']['median_step_cpu_s']:.3f} s / "
              f"{r['transformers']['median_step_cpu_s']:.3f} s; {r['qwenlab']['median_minor_page_faults']:,.0f} / "
              f"{r['transformers']['median_minor_page_faults']:,.0f} faults")
    write_json(args.out, args, results)
    plot_path = args.plot if args.plot is not None else (
        str(REPO / "docs" / "bench_train.png") if args.only is None and args.workloads == "pretrain,sft" else "")
    if plot_path:
        plot(results, args, plot_path)
        print(f"wrote {plot_path}")


def plot(results: list[dict], args, path: str) -> None:
    """tokens/s of both libraries per workload and model, the CPU-time speedup over each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['workload']}\n{r['model'].split(' (')[0]}" for r in results]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = range(len(results))
    for offset, library in ((-0.2, "qwenlab"), (0.2, "transformers")):
        ax.bar([i + offset for i in x], [r[library]["tokens_per_s"] for r in results], 0.4, label=library)
    for i, r in enumerate(results):
        top = max(r["qwenlab"]["tokens_per_s"], r["transformers"]["tokens_per_s"])
        ax.text(i, top * 1.02, f"{r['speedup_cpu_time']:.2f}x", ha="center", fontsize=9)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("training tokens/s (one thread)")
    ax.set_title(f"Training step, float32, batch {args.batch} x {args.seq_len}, CPU "
                 f"(median of {args.repeats}; CPU-time speedup above)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
