"""Correctness check of qwenlab's CUDA code paths: one short run (about a minute) on a GPU machine.

Each check runs on ``--device`` with random tiny checkpoints that transformers builds in a temporary directory
(``tests/conftest.py``'s ``hf_checkpoint``); thresholds are the CPU tests' unless a comment says otherwise.
* ``parity-*``: logits vs transformers on the device for qwen2 (QKV bias), qwen3 (QK-norm), qwen3_moe;
  float32 with TF32 off (max |diff| <= 1e-4 x max |logit|) and bfloat16 (argmax agreement >= 0.95).
* ``engine-*``: LLMEngine float32 greedy (paged KV, batched prompts of different lengths, late arrivals, CUDA
  graphs on CUDA) == transformers' greedy ``generate``, every sampled logits row within 1e-4 of a full
  forward; a bfloat16 run that must complete (tokens/s).
* ``quant-*``: int8/int4 (``quant_linear``'s "device" route on CUDA): drift within tests/test_quant.py's
  bounds, equal to the same quantized model on CPU, greedy agreement through the engine.
* ``train-*``: ``training_step`` on the device vs on CPU from the same weights and packed batch: step-1 loss
  within 1e-4 relative, grad norm and step-2 loss within 1e-3; bf16 autocast: finite, decreasing loss.

A check that fails records its traceback and the run goes on. The JSON is rewritten after every check (a
killed run keeps what it did) to ``--out``: $OUT/gpu_check.json when OUT is set, else ./gpu_check.json.

    PYTHONPATH=. python scripts/gpu_check.py                                  # on the GPU machine
    PYTHONPATH=. nice python scripts/gpu_check.py --device cpu --threads 1    # validate the script on a CPU
    PYTHONPATH=. python scripts/gpu_check.py --only engine,quant-greedy       # rerun a subset
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Off the CPU the AVX2 kernels only serve int4's scale search (at quantization time), and their first use
# compiles them (minutes on a fresh machine); QWENLAB_KERNELS=0 runs the same search in torch.
os.environ.setdefault("QWENLAB_KERNELS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from qwenlab.checkpoint import load_model  # noqa: E402
from qwenlab.engine import LLMEngine  # noqa: E402
from qwenlab.train import distributed as D  # noqa: E402
from qwenlab.train.data import IGNORE_INDEX, Rows  # noqa: E402
from qwenlab.train.recipes import MoEConfig, OptimConfig  # noqa: E402
from qwenlab.train.trainer import build_optimizer, training_step  # noqa: E402
from tests.conftest import hf_checkpoint  # noqa: E402
from tests.test_engine_helpers import LogitsRecorder, greedy, make_engine, random_prompts, run_all  # noqa: E402
from tests.test_quant import INT4_REL, INT8_REL, _peaked_checkpoint, rel_error  # noqa: E402

FAMILIES = ["qwen2", "qwen3", "qwen3_moe"]
FP32_REL = 1e-4  # tests/reference/test_parity.py assert_close_logits: max |diff| <= 1e-4 x max |logit|
# bf16 rounds every activation to ~3 significant digits, so positions whose top-2 logit gap is below that
# noise may flip; on GPU cuBLAS may also pick other accumulation orders for the two implementations' GEMMs.
# The CPU test demands 0.99; here 0.95. A real bug (RoPE, norms, routing) gives near-chance agreement (~1/384).
BF16_AGREEMENT = 0.95
DEV = torch.device("cpu")
TMP = Path(".")
_CHECKPOINTS: dict = {}


def checkpoint(family: str, seed: int = 0, **overrides):
    """(directory, transformers float32 model on DEV), built once per (family, seed, overrides)."""
    key = (family, seed, tuple(sorted(overrides.items())))
    if key not in _CHECKPOINTS:
        directory, hf = hf_checkpoint(family, TMP / f"{family}-{len(_CHECKPOINTS)}", seed=seed, **overrides)
        _CHECKPOINTS[key] = (directory, hf.to(DEV))
    return _CHECKPOINTS[key]


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def random_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 384, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEV)


# ---- 1. logit parity ------------------------------------------------------------------------------------------
def parity_fp32(m: dict, family: str):
    directory, hf = checkpoint(family)
    ids = random_ids(2, 48, seed=1)
    ours = load_model(directory, dtype=torch.float32, device=DEV)
    with torch.no_grad():
        a, b = ours(ids).float(), hf(ids).logits.float()
    assert a.shape == b.shape, (a.shape, b.shape)
    m["max_abs_diff"], m["max_abs_logit"] = (a - b).abs().max().item(), b.abs().max().item()
    assert m["max_abs_diff"] <= FP32_REL * m["max_abs_logit"], f"max |diff| {m['max_abs_diff']:.3g} > 1e-4 x max"


def parity_bf16(m: dict, family: str):
    from transformers import AutoModelForCausalLM

    directory, _ = checkpoint(family, hidden_size=128, intermediate_size=256)  # as test_bfloat16_same_argmax
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(DEV).eval()
    ours = load_model(directory, dtype=torch.bfloat16, device=DEV)
    ids = random_ids(4, 64, seed=3)
    with torch.no_grad():
        a, b = ours(ids).float(), hf(ids).logits.float()
    m["max_abs_diff"], m["max_abs_logit"] = (a - b).abs().max().item(), b.abs().max().item()
    m["argmax_agreement"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert m["argmax_agreement"] >= BF16_AGREEMENT, f"argmax agrees on only {m['argmax_agreement']:.1%} of positions"


# ---- 2. engine ------------------------------------------------------------------------------------------------
def engine_greedy_fp32(m: dict, family: str, cuda_graphs: bool | None = None):
    directory, hf = checkpoint(family, seed=1)
    engine = make_engine(directory, device=str(DEV), cuda_graphs=cuda_graphs)  # block_size 4: many blocks
    recorder = LogitsRecorder(engine)
    prompts = random_prompts([5, 11, 17, 30, 3, 23], seed=2)
    first = {f"r{i}": (p, greedy(32)) for i, p in enumerate(prompts[:4])}
    late = {f"r{i}": (p, greedy(32)) for i, p in enumerate(prompts[4:], start=4)}  # join after 3 steps
    finished = run_all(engine, first, late)
    graphs = engine.runner.graphs
    m["cuda_graphs_captured"] = len(graphs.graphs) if graphs is not None else 0
    m["steps"], m["max_rel_logit_err"], divergences = engine.stats()["steps"], 0.0, []
    for rid, (prompt, _) in {**first, **late}.items():
        got = finished[rid].outputs[0].token_ids
        ids = torch.tensor([prompt], device=DEV)
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False)[0, len(prompt):].tolist()
        with torch.no_grad():
            full = hf(torch.tensor([prompt + got], device=DEV)).logits[0].float()
        rows = recorder.rows[(rid, 0)]
        assert len(rows) == len(got) == 32, (len(rows), len(got))
        for i, row in enumerate(rows):
            ref_row = full[len(prompt) - 1 + i]
            err = ((row.to(DEV) - ref_row).abs().max() / ref_row.abs().max()).item()
            m["max_rel_logit_err"] = max(m["max_rel_logit_err"], err)
        if got != ref:
            j = next(i for i, (x, y) in enumerate(zip(got, ref)) if x != y)
            top2 = full[len(prompt) - 1 + j].topk(2).values
            divergences.append(f"{rid} (prompt {len(prompt)}): first divergence at new token {j}: engine {got[j]}, "
                               f"transformers {ref[j]} (top-2 logit gap there {(top2[0] - top2[1]).item():.2e})")
    m["divergences"] = divergences
    assert not divergences, "; ".join(divergences)
    assert m["max_rel_logit_err"] <= FP32_REL, f"engine logits off by {m['max_rel_logit_err']:.2e} relative"
    if DEV.type == "cuda" and cuda_graphs is not False and family != "qwen3_moe":
        assert m["cuda_graphs_captured"] > 0, "tokens match, but no decode step ran through a CUDA graph"


def engine_bf16(m: dict):
    directory, _ = checkpoint("qwen3", hidden_size=128, intermediate_size=256)
    engine = LLMEngine(directory, dtype="bfloat16", device=str(DEV), kv_cache_memory="64MB", log_stats=False, seed=0)
    n, new = (4, 16) if DEV.type == "cpu" else (32, 64)
    prompts = random_prompts(range(8, 8 + 3 * n, 3), seed=7)
    run_all(engine, {f"w{i}": (p, greedy(new)) for i, p in enumerate(prompts)})  # warm-up: lazy inits, CUDA graphs
    requests = {f"b{i}": (p, greedy(new)) for i, p in enumerate(prompts)}  # (prompts now prefix-cached)
    sync()
    start = time.perf_counter()
    finished = run_all(engine, requests)
    sync()
    elapsed = time.perf_counter() - start
    m.update(requests=n, new_tokens_each=new, seconds=round(elapsed, 3), tokens_per_s=round(n * new / elapsed, 1),
             steps=engine.stats()["steps"])
    assert sorted(finished) == sorted(requests)
    assert all(len(finished[r].outputs[0].token_ids) == new for r in requests)


# ---- 3. quantization ------------------------------------------------------------------------------------------
def quant_drift(m: dict, family: str):
    from qwenlab.quant import linear_route

    directory, _ = checkpoint(family, seed=1)
    ids = random_ids(2, 12, seed=0)
    m["route"] = linear_route(torch.zeros(2, 64, device=DEV))
    with torch.no_grad():
        ref = load_model(directory, dtype="float32", device=DEV)(ids)
        for method, limit in (("int8", INT8_REL), ("int4", INT4_REL)):
            model = load_model(directory, dtype="float32", device=DEV, quantization=method, group_size=32)
            assert all(b.device.type == DEV.type for b in model.buffers()), "quantized buffers not on the device"
            out = model(ids)
            on_cpu = load_model(directory, dtype="float32", quantization=method, group_size=32)(ids.cpu())
            m[f"{method}_rel_err"], m[f"{method}_vs_cpu"] = rel_error(out, ref), rel_error(out.cpu(), on_cpu)
            assert m[f"{method}_rel_err"] < limit, f"{method} drift {m[f'{method}_rel_err']:.3f} >= {limit}"
            assert m[f"{method}_vs_cpu"] < 1e-4, f"{method} on {DEV} differs from CPU by {m[f'{method}_vs_cpu']:.2e}"
        bf16 = load_model(directory, dtype="bfloat16", device=DEV, quantization="int8")(ids)
        m["int8_bf16_rel_err"] = rel_error(bf16, ref)
        assert m["int8_bf16_rel_err"] < 0.05, f"int8 with bf16 activations drifts {m['int8_bf16_rel_err']:.3f}"


def quant_greedy(m: dict, preset: str):
    from qwenlab import LLM, SamplingParams

    (TMP / preset).mkdir(exist_ok=True)
    directory = _peaked_checkpoint(TMP / preset, preset)
    prompts = [[5, 17, 99, 3], [200, 1, 45], [7] * 9]
    params = SamplingParams(max_tokens=16, temperature=0)

    def run(dtype="float32", **kwargs):
        llm = LLM(str(directory), dtype=dtype, kv_cache_memory="16MB", device=str(DEV), log_stats=False, **kwargs)
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]

    def agreement(got):
        return sum(a == b for r, g in zip(reference, got) for a, b in zip(r, g)) / sum(len(r) for r in reference)

    reference = run()
    m["int8_agreement"] = agreement(run(quantization="int8"))
    m["int4_agreement"] = agreement(run(quantization="int4"))
    m["bf16_int8_agreement"] = agreement(run(dtype="bfloat16", quantization="int8"))
    assert m["int8_agreement"] == 1.0, "int8 greedy tokens differ from the unquantized model's"
    assert m["int4_agreement"] >= 0.75 and m["bf16_int8_agreement"] >= 0.75, "int4 / bf16-int8 agreement < 75%"


# ---- 4. training ----------------------------------------------------------------------------------------------
def packed_rows(batch: int = 4, seq: int = 64, seed: int = 0) -> Rows:
    """Two documents per row (document-masked attention, positions restarting), next-token labels."""
    ids = np.random.default_rng(seed).integers(0, 384, (batch, seq))
    cut = seq // 3
    doc_ids = np.tile((np.arange(seq) >= cut).astype(np.int64), (batch, 1))
    positions = np.where(doc_ids == 0, np.arange(seq), np.arange(seq) - cut)
    labels = np.full((batch, seq), IGNORE_INDEX, np.int64)
    labels[:, :-1] = ids[:, 1:]
    labels[:, cut - 1] = IGNORE_INDEX  # a document's last token predicts nothing
    return Rows(ids, labels, positions, doc_ids, np.ones((batch, seq), bool))


def train_steps(directory, device: torch.device, steps: int, lr: float, autocast=None) -> list[dict]:
    torch.manual_seed(0)
    model = load_model(directory, dtype=torch.float32, device=device).train()
    optimizer = build_optimizer(model, OptimConfig(lr=lr))  # fused AdamW, clipping folded in
    rows, info = packed_rows(), D.DistInfo(device=device)
    kwargs = {"autocast": autocast} if autocast else {}
    return [training_step(model, optimizer, rows, MoEConfig(), 1.0, len(rows), info, **kwargs) for _ in range(steps)]


def train_parity(m: dict, family: str):
    directory, _ = checkpoint(family, seed=2)
    cpu, dev = train_steps(directory, torch.device("cpu"), 2, 1e-3), train_steps(directory, DEV, 2, 1e-3)
    for key, i, bound in (("loss", 0, 1e-4), ("grad_norm", 0, 1e-3), ("loss", 1, 1e-3)):
        name = f"{key}{i + 1}"
        m[f"{name}_cpu"], m[f"{name}_dev"] = cpu[i][key], dev[i][key]
        m[f"{name}_rel_diff"] = abs(dev[i][key] - cpu[i][key]) / abs(cpu[i][key])
        assert m[f"{name}_rel_diff"] <= bound, f"step {i + 1} {key}: {dev[i][key]} on {DEV} vs {cpu[i][key]} on CPU"


def train_bf16_autocast(m: dict, family: str):
    directory, _ = checkpoint(family, seed=2)
    steps = train_steps(directory, DEV, 10, 3e-3, lambda: torch.autocast(DEV.type, dtype=torch.bfloat16))
    m["losses"] = [round(s["loss"], 5) for s in steps]
    assert all(math.isfinite(x) for x in m["losses"]), "non-finite loss"
    assert m["losses"][-1] < 0.95 * m["losses"][0], "loss did not decrease over 10 steps on a repeated batch"


# ---- driver ---------------------------------------------------------------------------------------------------
def all_checks() -> list[tuple[str, callable]]:
    checks = [(f"parity-fp32-{f}", lambda m, f=f: parity_fp32(m, f)) for f in FAMILIES]
    checks += [(f"parity-bf16-{f}", lambda m, f=f: parity_bf16(m, f)) for f in FAMILIES]
    checks += [(f"engine-fp32-{f}", lambda m, f=f: engine_greedy_fp32(m, f)) for f in ("qwen3", "qwen3_moe")]
    if DEV.type == "cuda":
        checks.append(("engine-fp32-qwen3-eager", lambda m: engine_greedy_fp32(m, "qwen3", cuda_graphs=False)))
    checks.append(("engine-bf16-throughput", engine_bf16))
    checks += [(f"quant-drift-{f}", lambda m, f=f: quant_drift(m, f)) for f in FAMILIES]
    checks += [(f"quant-greedy-{p}", lambda m, p=p: quant_greedy(m, p)) for p in ("qwen3-0.6b", "qwen2.5-0.5b")]
    checks += [(f"train-fp32-vs-cpu-{f}", lambda m, f=f: train_parity(m, f)) for f in ("qwen3", "qwen3_moe")]
    checks += [(f"train-bf16-autocast-{f}", lambda m, f=f: train_bf16_autocast(m, f)) for f in ("qwen3", "qwen3_moe")]
    return checks


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "transformers": transformers.__version__, "device": str(DEV), "threads": torch.get_num_threads(),
           "QWENLAB_KERNELS": os.environ.get("QWENLAB_KERNELS")}
    try:
        env["qwenlab_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # no git on the machine
        env["qwenlab_commit"] = None
    if DEV.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(DEV)
        env.update(gpu=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(DEV))),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    return env


def disable_tf32() -> None:
    """Full float32 matmuls for the float32 checks (torch >= 2.9 spells it fp32_precision; the allow_tf32
    flags are deprecated there, and mixing the two spellings is best avoided)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _timeout(signum, frame):
    raise TimeoutError("check exceeded --check-timeout")


def run_check(name: str, fn, limit: int) -> dict:
    metrics: dict = {}
    start = time.perf_counter()
    signal.alarm(limit)  # a Python-level hang (scheduler loop) becomes a TimeoutError; 0 = off
    try:
        fn(metrics)
        sync()  # asynchronous CUDA errors belong to this check
        status, error = "PASS", None
    except Exception:  # record it and go on (Ctrl-C still stops the run)
        status, error = "FAIL", traceback.format_exc()
    finally:
        signal.alarm(0)
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    seconds = time.perf_counter() - start
    return {"name": name, "status": status, "seconds": round(seconds, 2), "metrics": metrics, "error": error}


def summary(metrics: dict, width: int = 90) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    text = ", ".join(f"{k}={fmt(v)}" for k, v in metrics.items() if not isinstance(v, list) or k == "losses")
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> int:
    global DEV, TMP
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT")
                        else "gpu_check.json")
    parser.add_argument("--only", default=None, help="comma-separated substrings of check names to run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--check-timeout", type=int, default=120, help="seconds per check (0: no limit)")
    args = parser.parse_args()
    DEV = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    report = {"environment": environment(), "results": []}
    print("environment: " + json.dumps(report["environment"]), flush=True)
    if DEV.type == "cuda":
        if not torch.cuda.is_available():
            report["error"] = "torch.cuda.is_available() is False"
            out.write_text(json.dumps(report, indent=2))
            print(report["error"], flush=True)
            return 2
        disable_tf32()
    signal.signal(signal.SIGALRM, _timeout)
    checks = [(n, f) for n, f in all_checks() if not args.only or any(s in n for s in args.only.split(","))]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        TMP = Path(tmp)
        for i, (name, fn) in enumerate(checks, 1):
            print(f"[{time.perf_counter() - t0:6.1f}s] ({i}/{len(checks)}) {name} ...", flush=True)
            result = run_check(name, fn, args.check_timeout)
            report["results"].append(result)
            print(f"[{time.perf_counter() - t0:6.1f}s]   {result['status']} in {result['seconds']:.1f}s  "
                  f"{summary(result['metrics'], 200)}", flush=True)
            if result["error"]:
                print(result["error"], flush=True)
            report["total_seconds"] = round(time.perf_counter() - t0, 1)
            out.write_text(json.dumps(report, indent=2, default=str))  # after every check: a killed run keeps it
    failed = [r for r in report["results"] if r["status"] != "PASS"]
    print(f"\n{'check':<32} {'status':<6} {'s':>6}  metrics")
    for r in report["results"]:
        print(f"{r['name']:<32} {r['status']:<6} {r['seconds']:>6.1f}  {summary(r['metrics'])}")
    for r in failed:
        print(f"FAILED {r['name']}: {r['error'].strip().splitlines()[-1]}")
    print(f"\n{len(report['results']) - len(failed)}/{len(report['results'])} passed in {report['total_seconds']}s "
          f"on {report['environment'].get('gpu', DEV)}; results in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
