"""The training loop: stages in order, each from the previous stage's weights; exact resume.

One optimizer step consumes ``global_batch`` packed rows. Every rank builds the same rows (cheap: a few
memmap slices) and runs its own ``micro_batch``-row slices, ``grad_accum`` of them, so a recipe gives
the same global batch, and the same losses, on 1 process or N. Losses are token sums divided by the
global-batch token count (see ``losses.py``); with FSDP2 averaging gradients over ranks, each rank
scales its backward by the world size.

Entry point: :func:`train` (``qwenlab train`` calls it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import build_empty, load_model, to_torch_dtype
from ..config import ModelConfig, preset
from ..errors import TrainingError
from ..model import fused
from . import distributed as D
from .checkpointing import CheckpointManager, merge_lora_state, write_hf_checkpoint
from .data import IGNORE_INDEX, ChatOptions, DocumentAttention, PackedLoader, Rows, open_sources
from .lora import apply_lora, load_lora_state, read_adapter, save_adapter
from .losses import BalanceTracker, cross_entropy_sum, expert_load_summary, router_z_sum
from .recipes import OptimConfig, RunConfig, StageConfig, recipe_to_dict

# bf16 dense peak of common accelerators (TFLOP/s), for MFU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40": 181.0,
                   "L4": 121.0, "A10": 125.0, "4090": 165.0, "3090": 71.0}
VOLATILE_FIELDS = ("progress", "threads", "log_every", "save_every", "keep_last", "peak_tflops", "device")


# ---- schedules, FLOPs ------------------------------------------------------------------------------------
def learning_rate(optim: OptimConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine / WSD (warmup-stable-decay, linear decay at the end) / constant."""
    lr, floor = optim.lr, optim.lr * optim.min_lr_ratio
    if step < optim.warmup_steps:
        return lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return lr
    if optim.schedule == "cosine":
        progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, round(total * optim.decay_fraction))
    decay_start = total - decay_steps
    if step < decay_start:
        return lr
    return lr - (lr - floor) * (step - decay_start + 1) / decay_steps


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul parameters (LM head included, embedding lookup not)
    plus causal attention 12 * layers * q_width * seq_len (the PaLM convention)."""
    counts = config.param_counts()
    embed = config.vocab_size * config.hidden_size
    matmul = counts["active"] - embed + (embed if config.tie_word_embeddings else 0)
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * matmul + attention


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float | None) -> float:
    """Peak FLOP/s of one device: configured, the GPU's bf16 dense peak, or on CPU a measured matmul rate."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), 312.0) * 1e12
    return measured_matmul_flops(dtype)


def measured_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 512, budget_s: float = 0.3) -> float:
    """Best rate of an n x n matmul on this CPU (all threads) within a small time budget: what CPU MFU
    refers to (CPUs have no published peak we could look up)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best, spent = float("inf"), 0.0
    while spent < budget_s:
        start = time.perf_counter()
        torch.mm(a, b)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * n**3 / best


# ---- model ---------------------------------------------------------------------------------------------------
def set_model_config(model, config: ModelConfig) -> None:
    """Swap the config of a built model (RoPE base/scaling change between stages); tables rebuild lazily."""
    model.config = config
    model.model.rotary.config = config
    model.model.rotary._cache = None


def count_moe_layers(config: ModelConfig) -> int:
    return sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decayed (matrices) and not decayed parameters; under tensor parallel one pair per device mesh
    (sharded DTensors and replicated parameters cannot share one fused kernel call)."""
    found: dict[str, tuple[list, list]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay, no_decay = found.setdefault(str(D.mesh_key(param)), ([], []))
        (decay if param.ndim >= 2 and "embed_tokens" not in name else no_decay).append(param)
    if len(found) <= 1:
        decay, no_decay = next(iter(found.values()), ([], []))
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for _, (decay, no_decay) in sorted(found.items())
            for group in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if group["params"]]


def build_optimizer(model, optim: OptimConfig, fused_ok: bool = True):
    """AdamW over the trainable parameters; fused (one kernel for all tensors) unless turned off. On CPU
    the fused kernel is ~8x faster than the foreach one, which matters for small models."""
    fused = fused_ok if optim.fused is None else optim.fused
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             **({"fused": True} if fused else {}))


def _grad_norm(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    by_mesh: dict = {}
    for p in params:
        by_mesh.setdefault(D.mesh_key(p.grad), []).append(p.grad)
    if len(by_mesh) == 1:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    # tensor parallel: sharded and replicated gradients on different meshes; one norm per mesh, then combined
    norms = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        for grads in by_mesh.values():
            torch._foreach_mul_(grads, coef)
    return float(total)


def _clip_into_optimizer(model, optimizer, max_norm: float, info: D.DistInfo) -> float | None:
    """Gradient clipping folded into the fused AdamW kernel (one process): the norm is computed as
    clip_grad_norm_ does, and instead of a pass multiplying every gradient by the clip coefficient, the
    optimizer divides them by its inverse on the fly (the ``grad_scale`` input that GradScaler uses). Returns
    the norm, or None where this does not apply (the caller then clips the usual way)."""
    if info.enabled or not optimizer.defaults.get("fused") or hasattr(optimizer, "grad_scale"):
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if float(coef) < 1.0:
            optimizer.grad_scale = (1.0 / coef).to(torch.float32)
    return float(norm)


class TrainingAttention(DocumentAttention):
    """``DocumentAttention`` for a training forward. On CPU in float32: the compiled kernels' attention
    (flash-attention order on the sgemm; at S = 256 forward 2x, forward + backward 1.5x the blocked attention;
    no S^2 memory bound), else the blocked attention of ``qwenlab.model.fused`` (batched matmuls
    over blocks of query rows, the causal upper triangle of blocks skipped); elsewhere the same kernels as
    ``DocumentAttention``."""

    def __init__(self, doc_ids):
        super().__init__(doc_ids)
        self._kernel_inputs = None  # (ops, first visible key per token or None), built on first use

    def _kernel(self):
        if self._kernel_inputs is None:
            ops = fused.cpu_kernels() if self.doc_ids.device.type == "cpu" else None
            first_key = None if ops is None or self.single_document else fused.document_first_key(self.doc_ids)
            usable = ops is not None and (self.single_document or first_key is not None)
            self._kernel_inputs = (ops if usable else None, first_key)
        return self._kernel_inputs

    def attend(self, layer_idx, q, k, v, scale):
        if q.shape[2] > 1 and fused.wants_kernel_attention(q, k, v):
            ops, first_key = self._kernel()
            if ops is not None:
                return fused.kernel_attention(q, k, v, scale, first_key, ops)
        if q.shape[2] > 1 and fused.wants_blocked_attention(q, k, v):
            return fused.blocked_attention(q, k, v, scale, self.mask)
        return super().attend(layer_idx, q, k, v, scale)


class StepLoss:
    """The loss of one optimizer step, one micro-batch at a time (see losses.py for the normalisation)."""

    def __init__(self, config: ModelConfig, moe, rows: Rows, all_reduce, device):
        self.config, self.moe_cfg, self.all_reduce, self.device = config, moe, all_reduce, device
        self.moe_layers = count_moe_layers(config)
        self.targets = max(1, int((rows.labels != IGNORE_INDEX).sum()))
        self.total_rows = max(1, int(rows.valid.sum())) * max(1, self.moe_layers)
        self.aux_coef = config.router_aux_loss_coef if moe.aux_coef is None else moe.aux_coef
        self.tracker = None
        if self.moe_layers and moe.balance != "none":
            self.tracker = BalanceTracker(moe.balance, config.num_experts, config.num_experts_per_tok,
                                          self.total_rows, all_reduce, device)
        self.ce = torch.zeros((), device=device)
        self.z = torch.zeros((), device=device)

    def micro_batch(self, model, rows: Rows) -> torch.Tensor:
        """Forward one micro-batch; returns its share of the step loss (backward it)."""
        batch = rows.to_torch(self.device)
        labels = batch["labels"].reshape(-1)
        index = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        moe = self.moe_layers > 0
        out = model(batch["input_ids"], positions=batch["positions"], context=TrainingAttention(batch["doc_ids"]),
                    logits_indices=index, output_router_logits=moe, loss_targets=labels[index])
        ce = out.ce_sum
        loss = ce / self.targets
        if self.tracker is not None:
            loss = loss + self.aux_coef * self.tracker.loss(out.router_logits, batch["valid"])
        if moe and self.moe_cfg.z_loss_coef > 0:
            z = router_z_sum(out.router_logits, batch["valid"]) / self.total_rows
            loss = loss + self.moe_cfg.z_loss_coef * z
            self.z += z.detach()
        self.ce += ce.detach()
        return loss

    def finish(self) -> dict:
        """Step metrics, reduced over ranks. Collective: every rank calls it."""
        totals = self.all_reduce(torch.stack([self.ce, self.z]))
        ce = float(totals[0]) / self.targets
        metrics = {"loss": ce, "ce": ce, "targets": self.targets}
        if self.tracker is not None:
            aux, selected = self.tracker.finish()
            metrics["aux"] = aux
            metrics["loss"] += self.aux_coef * aux
            metrics.update(expert_load_summary(selected))
        if self.moe_layers and self.moe_cfg.z_loss_coef > 0:
            metrics["z_loss"] = float(totals[1])
            metrics["loss"] += self.moe_cfg.z_loss_coef * float(totals[1])
        return metrics


def training_step(model, optimizer, rows: Rows, moe, grad_clip: float, micro: int, info: D.DistInfo,
                  autocast=contextlib.nullcontext) -> dict:
    """One optimizer step on the global batch ``rows``: this rank's micro-batches, clip, AdamW."""
    W = info.dp_size  # the ranks of one tensor-parallel group train the same rows
    accum = len(rows) // (micro * W)
    step_loss = StepLoss(model.config, moe, rows, lambda t: D.all_reduce_sum(t, info), info.device)
    for m in range(accum):
        first = (m * W + info.dp_rank) * micro
        with autocast():
            loss = step_loss.micro_batch(model, rows.slice(first, first + micro))
        (loss * W).backward()  # FSDP2 averages gradients over the data-parallel ranks
    grad_norm = _clip_into_optimizer(model, optimizer, grad_clip, info)
    if grad_norm is None:
        grad_norm = _grad_norm(model, grad_clip)
    optimizer.step()
    optimizer.__dict__.pop("grad_scale", None)
    optimizer.zero_grad(set_to_none=True)
    return {**step_loss.finish(), "grad_norm": round(grad_norm, 6)}


class Trainer:
    def __init__(self, config: RunConfig, info: D.DistInfo, resume: bool = False, stop_after: int | None = None):
        self.config, self.info, self.stop_after = config, info, stop_after
        self.run_dir = Path(config.out)
        self.ckpt = CheckpointManager(self.run_dir, info, config.keep_last)
        self.dtype = to_torch_dtype(config.dtype)
        if config.threads and info.device.type == "cpu":
            torch.set_num_threads(config.threads)
        self.fingerprint = _fingerprint(config)
        self.resume_from = self._resume_point(resume)
        self.state = CheckpointManager.read_state(self.resume_from) if self.resume_from else None
        self.tokenizer_dir = self._tokenizer_dir()
        self.model = self._build_model()
        self.model_config = self.model.config
        self.moe_layers = count_moe_layers(self.model_config)
        D.parallelize(self.model, info, config.mixed_precision, config.activation_checkpointing, config.compile)
        self.model.train()
        self.peak = peak_flops(info.device, torch.bfloat16 if config.mixed_precision == "bfloat16" else self.dtype,
                               config.peak_tflops) if info.is_main else 1.0
        self.history: list[dict] = []
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.json").write_text(json.dumps(recipe_to_dict(config), indent=2, default=str))
            self._trim_log()

    # ---- setup ---------------------------------------------------------------------------------------------
    def _resume_point(self, resume: bool) -> Path | None:
        latest = self.ckpt.latest()
        if not resume:
            if latest is not None:
                raise TrainingError(f"{self.run_dir} already holds checkpoints (latest {latest.name}); pass --resume "
                                    "to continue it, or choose another run.out")
            return None
        if latest is None:
            if self.info.is_main:
                print(f"qwenlab train: no checkpoint in {self.run_dir}; starting from the beginning", file=sys.stderr)
            return None
        state = CheckpointManager.read_state(latest)
        if state.get("fingerprint") != self.fingerprint and self.info.is_main:
            print("qwenlab train: warning: the recipe differs from the one this checkpoint was written with",
                  file=sys.stderr)
        return latest

    def _tokenizer_dir(self) -> Path | None:
        model = self.config.model
        for candidate in (model.tokenizer, model.checkpoint):
            if candidate and candidate != "byte" and (Path(candidate) / "tokenizer.json").is_file():
                return Path(candidate)
        return None

    @property
    def tokenizer_spec(self) -> str | None:
        """What raw data is tokenized with (None: no tokenizer; only prepared directories can be used)."""
        if self.config.model.tokenizer:
            return self.config.model.tokenizer
        return str(self.tokenizer_dir) if self.tokenizer_dir else None

    def _base_config(self) -> ModelConfig:
        source = self.config.model
        if source.checkpoint:
            return ModelConfig.from_json_file(Path(source.checkpoint) / "config.json").replace(**source.overrides)
        return preset(source.preset, **source.overrides)

    def _build_model(self):
        config, source = self.config, self.config.model
        resumed_full = self.resume_from is not None and (self.resume_from / "model").is_dir()
        if resumed_full:
            model = load_model(self.resume_from / "model", dtype=self.dtype, device=self.info.device)
        elif source.checkpoint:
            model = load_model(source.checkpoint, dtype=self.dtype, device=self.info.device)
            if source.overrides:
                set_model_config(model, model.config.replace(**source.overrides))
        else:
            model = build_empty(self._base_config(), torch.float32, "cpu")
            model.init_weights(source.init_seed)
            model = model.to(device=self.info.device, dtype=self.dtype)
        if config.lora is not None:
            lora = config.lora
            apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets, seed=config.seed)
            if self.resume_from is not None:
                rope = self.state.get("model_config")
                if rope:
                    set_model_config(model, ModelConfig.from_hf_dict(rope))
                load_lora_state(model, read_adapter(self.resume_from / "adapter")[1], str(self.resume_from))
        return model

    def _trim_log(self) -> None:
        """On resume, drop log records past the checkpoint (they will be produced again)."""
        log = self.run_dir / "log.jsonl"
        if not log.is_file():
            return
        keep_until = self.state["global_step"] if self.state else 0
        kept = []
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= keep_until:
                kept.append(line)
        log.write_text("".join(f"{line}\n" for line in kept))

    # ---- run -------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        summary = {"run_dir": str(self.run_dir), "stages": []}
        offset = 0
        for index, stage in enumerate(self.config.stages):
            state = self.state
            done = state is not None and (index < state["stage"] or (index == state["stage"]
                                                                    and state["stage_step"] >= stage.steps))
            if done:
                if index == state["stage"]:
                    set_model_config(self.model, ModelConfig.from_hf_dict(state["model_config"]))
                offset += stage.steps
                continue
            resume = state if state is not None and index == state["stage"] else None
            result = self.run_stage(index, stage, offset, resume)
            summary["stages"].append(result)
            offset += stage.steps
            if result.get("stopped"):
                summary["stopped"] = True
                break
        if self.info.is_main and (self.run_dir / "log.jsonl").is_file():
            from .plot import plot_run

            summary["plot"] = str(plot_run(self.run_dir))
        return summary

    def _stage_config(self, stage: StageConfig) -> ModelConfig:
        config = self.model.config
        changes = {}
        if stage.rope_theta is not None:
            changes["rope_theta"] = float(stage.rope_theta)
        if stage.rope_scaling is not None:
            changes["rope_scaling"] = dict(stage.rope_scaling) or None
        if stage.max_position_embeddings is not None:
            changes["max_position_embeddings"] = stage.max_position_embeddings
        elif stage.seq_len > config.max_position_embeddings and config.rope_type == "default":
            changes["max_position_embeddings"] = stage.seq_len
        return config.replace(**changes) if changes else config

    def _loader(self, stage: StageConfig, specs, index: int, eval_split: bool = False) -> PackedLoader:
        chat = ChatOptions(stage.train_on_thinking, stage.enable_thinking) if stage.kind == "sft" else None
        cache = self.run_dir / "data"
        if self.info.is_main:
            open_sources([(s.path, s.weight) for s in specs], cache, self.tokenizer_spec, chat,
                         progress=self.config.progress and not all(s.path.startswith("synthetic:") for s in specs))
        D.barrier(self.info)
        sources = open_sources([(s.path, s.weight) for s in specs], cache, self.tokenizer_spec, chat)
        vocab = self.model.config.vocab_size
        for dataset, _ in sources:
            if (top := dataset.max_token()) >= vocab:
                raise TrainingError(f"{dataset.path}: token id {top} does not fit the model's "
                                    f"vocabulary of {vocab}; prepared with another tokenizer?")
        seed = self.config.seed * 1000 + index + (500 if eval_split else 0)
        return PackedLoader(sources, stage.seq_len, seed=seed, split_documents=stage.kind == "pretrain",
                            shuffle=not eval_split)

    def _optimizer(self, optim: OptimConfig):
        return build_optimizer(self.model, optim)

    def run_stage(self, index: int, stage: StageConfig, offset: int, resume: dict | None) -> dict:
        info, config = self.info, self.config
        set_model_config(self.model, self._stage_config(stage))
        loader = self._loader(stage, stage.data, index)
        optimizer = self._optimizer(stage.optim)
        start = 0
        if resume is not None:
            loader.load_state_dict(resume["data"])
            D.load_full_optimizer_state(self.model, optimizer, CheckpointManager.read_optimizer(self.resume_from))
            start = resume["stage_step"]
        W = info.dp_size
        micro, accum = stage.micro_rows(W), stage.grad_accum(W)
        fpt = flops_per_token(self.model.config, stage.seq_len)
        if info.is_main:
            counts = self.model.config.param_counts()
            print(f"stage {index + 1}/{len(config.stages)} {stage.name!r} ({stage.kind}): {stage.steps} steps x "
                  f"{stage.global_batch} rows x {stage.seq_len} tokens; {info.world_size} process(es)"
                  f"{f' ({W} data-parallel x {info.tp} tensor-parallel)' if info.tp > 1 else ''}, micro-batch {micro}, "
                  f"accumulation {accum}; rope_theta {self.model.config.rope_theta:g}"
                  f"{', ' + self.model.config.rope_type if self.model.config.rope_type != 'default' else ''}; "
                  f"{counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active)"
                  + (f"; resuming at step {start}" if start else ""), file=sys.stderr)
        from tqdm import tqdm

        bar = tqdm(total=stage.steps, initial=start, desc=f"{stage.name}", unit="step", file=sys.stderr,
                   disable=not (info.is_main and config.progress), dynamic_ncols=True)
        last: dict = {}
        stopped = False
        try:
            for step in range(start, stage.steps):
                global_step = offset + step + 1
                torch.manual_seed(config.seed * 1_000_003 + global_step * 1_009 + info.dp_rank)
                lr = learning_rate(stage.optim, step, stage.steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                started = time.perf_counter()
                rows = loader.next_rows(stage.global_batch)
                metrics = self.train_step(rows, stage, optimizer)
                elapsed = time.perf_counter() - started
                tokens = int(rows.valid.sum())
                tok_s = tokens / elapsed
                record = {"kind": "train", "stage": stage.name, "step": global_step, "stage_step": step + 1,
                          "lr": lr, **metrics, "tokens": tokens, "tokens_per_s": round(tok_s, 1),
                          "mfu": round(fpt * tok_s / (self.peak * W), 5), "step_time": round(elapsed, 4)}
                last = record
                if global_step % config.log_every == 0 or step + 1 == stage.steps:
                    self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}",
                                mfu=f"{record['mfu']:.1%}", refresh=False)
                if stage.eval and stage.eval_every and (step + 1) % stage.eval_every == 0 and step + 1 < stage.steps:
                    self.evaluate(index, stage, global_step)
                if config.save_every and global_step % config.save_every == 0 and step + 1 < stage.steps:
                    self._save(global_step, index, stage, step + 1, loader, optimizer)
                if self.stop_after is not None and global_step >= self.stop_after:
                    stopped = step + 1 < stage.steps
                    if stopped:
                        break
        finally:
            bar.close()
        result = {"name": stage.name, "steps": stage.steps, "final_loss": last.get("loss")}
        if stopped:
            result["stopped"] = True
            return result
        if stage.eval:
            result["eval_loss"] = self.evaluate(index, stage, offset + stage.steps)
        self._export_stage(index, stage)
        self._save(offset + stage.steps, index, stage, stage.steps, loader, optimizer)
        if info.is_main:
            from .plot import plot_run

            plot_run(self.run_dir)
        return result

    # ---- one optimizer step ------------------------------------------------------------------------------------
    def _autocast(self):
        if self.config.mixed_precision == "bfloat16" and not self.info.fsdp:
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, rows: Rows, stage: StageConfig, optimizer) -> dict:
        W = self.info.dp_size
        return training_step(self.model, optimizer, rows, self.config.moe, stage.optim.grad_clip,
                             stage.micro_rows(W), self.info, self._autocast)

    # ---- held-out perplexity ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, index: int, stage: StageConfig, global_step: int) -> float:
        info, W = self.info, self.info.dp_size
        micro = stage.micro_rows(W)
        per_pass = micro * W
        n_rows = -(-stage.eval_rows // per_pass) * per_pass
        rows = self._loader(stage, stage.eval, index, eval_split=True).next_rows(n_rows)
        self.model.eval()
        sums = torch.zeros(2, device=info.device)
        for first in range(info.dp_rank * micro, n_rows, per_pass):
            batch = rows.slice(first, first + micro).to_torch(info.device)
            labels = batch["labels"].reshape(-1)
            index_ = (labels != IGNORE_INDEX).nonzero().squeeze(1)
            with self._autocast():
                logits = self.model(batch["input_ids"], positions=batch["positions"],
                                    context=DocumentAttention(batch["doc_ids"]), logits_indices=index_)
            sums[0] += cross_entropy_sum(logits, labels[index_])
            sums[1] += len(index_)
        self.model.train()
        sums = D.all_reduce_sum(sums, info)
        loss = float(sums[0] / sums[1].clamp(min=1))
        self._log({"kind": "eval", "stage": stage.name, "step": global_step, "eval_loss": loss,
                   "eval_ppl": math.exp(min(loss, 50.0)), "eval_targets": int(sums[1])})
        return loss

    # ---- outputs ---------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        self.history.append(record)
        with open(self.run_dir / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _trainer_state(self, index: int, stage: StageConfig, stage_step: int, global_step: int,
                       loader: PackedLoader) -> dict:
        return {"stage": index, "stage_name": stage.name, "stage_step": stage_step, "global_step": global_step,
                "data": loader.state_dict(), "fingerprint": self.fingerprint,
                "model_config": self.model.config.to_hf_dict(), "world_size": self.info.world_size}

    def _save(self, global_step: int, index: int, stage: StageConfig, stage_step: int, loader, optimizer) -> None:
        state = self._trainer_state(index, stage, stage_step, global_step, loader)
        lora_config = getattr(self.model, "lora_config", None)
        self.ckpt.save(global_step, self.model, optimizer, state, self.model.config, lora_config, self.tokenizer_dir)

    def _export_stage(self, index: int, stage: StageConfig) -> None:
        """RUN/stages/NN-name/: the stage's final weights as an HF checkpoint (and the adapter for LoRA)."""
        state = D.full_model_state(self.model, self.info)
        if not self.info.is_main:
            return
        target = self.run_dir / "stages" / f"{index + 1:02d}-{stage.name}"
        tmp = target.with_name(f".tmp-{target.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        lora_config = getattr(self.model, "lora_config", None)
        if lora_config is not None:
            save_adapter(state, lora_config, tmp / "adapter", base_model=self.config.model.checkpoint)
            state = merge_lora_state(state, lora_config)
        write_hf_checkpoint(state, self.model.config, tmp, dtype=self.config.export_dtype or self.config.dtype,
                            tokenizer_dir=self.tokenizer_dir)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        print(f"stage {stage.name!r} done: weights in {target}", file=sys.stderr)


def _fingerprint(config: RunConfig) -> str:
    data = recipe_to_dict(config)
    for key in VOLATILE_FIELDS:
        data.pop(key, None)
    data.pop("out", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train(config: RunConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run every stage of ``config`` (on this process, or as one rank of a torchrun job)."""
    info = D.init_distributed(config.device, config.tensor_parallel)
    try:
        summary = Trainer(config, info, resume=resume, stop_after=stop_after).run()
        # Every rank finishes (rank 0 still writes the loss plot) before the process group goes away: a rank
        # tearing gloo down while its peer is still busy was seen to abort at exit ("terminate called without
        # an active exception") once in a CI run. Only on success: after a failure a barrier could hang.
        D.barrier(info)
        return summary
    finally:
        fused.POOL.clear()  # the training passes' reused buffers (activations of a step) go back
        D.shutdown(info)


__all__ = ["StepLoss", "Trainer", "build_optimizer", "flops_per_token", "learning_rate", "set_model_config", "train",
           "training_step"]
