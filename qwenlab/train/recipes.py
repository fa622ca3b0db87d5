"""Training recipes: one TOML file describes the model, the optimisation and the stages.

::

    [run]            out, seed, device, dtype, mixed_precision, save_every, keep_last, ...
    [model]          preset (+ [model.overrides]) or checkpoint; tokenizer ("byte" or a directory)
    [optim]          defaults for every stage: lr, schedule (cosine | wsd | constant), warmup_steps, ...
    [moe]            balance (global | micro_batch | none), aux_coef, z_loss_coef
    [lora]           optional: rank, alpha, dropout, targets
    [[stages]]       name, kind (pretrain | sft), steps, seq_len, global_batch, micro_batch,
                     rope_theta / rope_scaling / max_position_embeddings (long-context stages),
                     [stages.optim] overrides, [[stages.data]] path + weight, [[stages.eval]]

Each stage starts from the previous stage's final weights. ``--set key=value`` edits the parsed TOML
before validation: ``optim.lr=1e-3``, ``stages.1.steps=20``, ``stages.*.seq_len=128``.
See docs/training.md for every field.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrainingError

SCHEDULES = ("cosine", "wsd", "constant")
BALANCE_MODES = ("global", "micro_batch", "none")
PRECISIONS = ("none", "bfloat16")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays linearly
    weight_decay: float = 0.1  # matrices only; norms, biases and embeddings are not decayed
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    fused: bool | None = None  # None: fused AdamW (one kernel; on CPU ~8x faster than foreach)


@dataclass
class MoEConfig:
    balance: str = "global"  # Qwen's global-batch balancing loss; "micro_batch" = transformers'; "none"
    aux_coef: float | None = None  # None: the model's router_aux_loss_coef
    z_loss_coef: float = 0.0  # router z-loss (mean squared logsumexp of router logits)


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelSource:
    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    checkpoint: str | None = None
    tokenizer: str | None = None  # "byte" or a directory with tokenizer.json; default: the checkpoint
    init_seed: int = 0


@dataclass
class DataSpec:
    path: str  # prepared directory, raw .txt/.jsonl file or directory, or "synthetic:KIND?docs=N&seed=S"
    weight: float = 1.0


@dataclass
class StageConfig:
    name: str
    steps: int
    seq_len: int
    data: list[DataSpec]
    global_batch: int = 8  # rows per optimizer step, over all ranks and micro-batches
    micro_batch: int = 0  # rows per forward on one rank; 0: global_batch / world size
    kind: str = "pretrain"  # pretrain: documents split across rows; sft: conversations kept whole
    optim: OptimConfig = field(default_factory=OptimConfig)
    rope_theta: float | None = None  # long context: raise the RoPE base (ABF)
    rope_scaling: dict | None = None  # and/or YaRN: {rope_type = "yarn", factor = 4.0, ...}
    max_position_embeddings: int | None = None
    eval: list[DataSpec] = field(default_factory=list)
    eval_rows: int = 16
    eval_every: int = 0  # 0: only at the end of the stage
    train_on_thinking: bool = True  # sft with raw chat files: learn the <think> block or not
    enable_thinking: bool | None = None

    def grad_accum(self, world_size: int) -> int:
        micro = self.micro_rows(world_size)
        return self.global_batch // (micro * world_size)

    def micro_rows(self, world_size: int) -> int:
        return self.micro_batch or max(1, self.global_batch // world_size)


@dataclass
class RunConfig:
    out: str
    stages: list[StageConfig]
    model: ModelSource = field(default_factory=ModelSource)
    optim: OptimConfig = field(default_factory=OptimConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    lora: LoRAConfig | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # parameter (master) dtype
    mixed_precision: str = "none"  # "bfloat16": autocast (1 process) / FSDP2 param dtype (many)
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 1
    save_every: int = 0  # steps between checkpoints (0: only at the end of each stage)
    keep_last: int = 2
    export_dtype: str | None = None  # dtype of the per-stage HF exports (default: dtype)
    peak_tflops: float | None = None  # for MFU; None: from the GPU model, or measured on CPU
    progress: bool = True
    threads: int | None = None  # torch.set_num_threads on CPU
    tensor_parallel: int = 1  # ranks per tensor-parallel group (DTensor TP); world / this = data-parallel ranks

    def validate(self, world_size: int = 1) -> "RunConfig":
        if not self.stages:
            raise TrainingError("the recipe has no [[stages]]")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise TrainingError(f"stage names must be unique, got {names}")
        if (self.model.preset is None) == (self.model.checkpoint is None):
            raise TrainingError("[model] needs exactly one of preset = ... or checkpoint = ...")
        if self.model.tokenizer is None and self.model.checkpoint is None:
            raise TrainingError("[model] tokenizer is required with a preset ('byte' or a checkpoint directory)")
        if self.moe.balance not in BALANCE_MODES:
            raise TrainingError(f"moe.balance must be one of {', '.join(BALANCE_MODES)}, got {self.moe.balance!r}")
        if self.mixed_precision not in PRECISIONS:
            raise TrainingError(f"run.mixed_precision must be one of {', '.join(PRECISIONS)}")
        if self.keep_last < 1:
            raise TrainingError("run.keep_last must be at least 1")
        if self.lora is not None and (self.lora.rank <= 0 or not self.lora.targets):
            raise TrainingError("lora.rank must be positive and lora.targets non-empty")
        check_world(world_size, self.tensor_parallel)
        if self.tensor_parallel > 1 and self.lora is not None:
            raise TrainingError("run.tensor_parallel > 1 is not supported with [lora]")
        for stage in self.stages:
            _validate_stage(stage, world_size // self.tensor_parallel)
        return self


def check_world(world: int, tensor_parallel: int) -> None:
    if not isinstance(tensor_parallel, int) or isinstance(tensor_parallel, bool) or tensor_parallel < 1:
        raise TrainingError(f"run.tensor_parallel must be a positive integer, got {tensor_parallel!r}")
    if world % tensor_parallel:
        raise TrainingError(f"run.tensor_parallel = {tensor_parallel} does not divide the world size {world} "
                            f"(run under torchrun with a multiple of {tensor_parallel} processes)")


def _validate_stage(stage: StageConfig, world_size: int) -> None:
    where = f"stage {stage.name!r}"
    for name in ("steps", "seq_len", "global_batch"):
        if not isinstance(getattr(stage, name), int) or getattr(stage, name) <= 0:
            raise TrainingError(f"{where}: {name} must be a positive integer, got {getattr(stage, name)!r}")
    if stage.kind not in ("pretrain", "sft"):
        raise TrainingError(f"{where}: kind must be pretrain or sft, got {stage.kind!r}")
    if not stage.data:
        raise TrainingError(f"{where}: no [[stages.data]] sources")
    micro = stage.micro_rows(world_size)
    if stage.global_batch % (micro * world_size):
        raise TrainingError(f"{where}: global_batch {stage.global_batch} is not a multiple of micro_batch {micro} "
                            f"x {world_size} data-parallel process(es)")
    optim = stage.optim
    if optim.schedule not in SCHEDULES:
        raise TrainingError(f"{where}: optim.schedule must be one of {', '.join(SCHEDULES)}, got {optim.schedule!r}")
    if optim.lr <= 0 or not 0 <= optim.min_lr_ratio <= 1 or optim.warmup_steps < 0:
        raise TrainingError(f"{where}: need lr > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0")
    if stage.rope_scaling is not None and not isinstance(stage.rope_scaling, dict):
        raise TrainingError(f"{where}: rope_scaling must be a table, e.g. {{rope_type = \"yarn\", factor = 4.0}}")


# ---- parsing ---------------------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] = (), world_size: int = 1) -> RunConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{path}: recipe not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainingError(f"{path}: invalid TOML ({exc})") from None
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, world_size, where=str(path))


def recipe_from_dict(raw: dict, world_size: int = 1, where: str = "recipe") -> RunConfig:
    raw = copy.deepcopy(raw)
    try:
        run = dict(raw.pop("run", {}))
        optim = raw.pop("optim", {})
        stages = [_stage(s, optim) for s in raw.pop("stages", [])]
        model = _build(ModelSource, raw.pop("model", {}), "model")
        moe = _build(MoEConfig, raw.pop("moe", {}), "moe")
        lora = _build(LoRAConfig, raw.pop("lora"), "lora") if "lora" in raw else None
        if raw:
            raise TrainingError(f"unknown section(s) {sorted(raw)}")
        if "out" not in run:
            raise TrainingError("[run] needs out = \"DIRECTORY\"")
        config = _build(RunConfig, {**run, "stages": stages, "model": model, "optim": _optim(optim, "optim"),
                                    "moe": moe, "lora": lora}, "run")
    except TrainingError as exc:
        raise TrainingError(f"{where}: {exc}") from None
    return config.validate(world_size)


def _stage(raw: dict, defaults: dict) -> StageConfig:
    raw = dict(raw)
    name = raw.get("name", "?")
    for key in ("data", "eval"):
        items = raw.get(key, [])
        if isinstance(items, (str, dict)):
            items = [items]
        raw[key] = [DataSpec(path=i) if isinstance(i, str) else _build(DataSpec, i, f"stage {name!r} {key}")
                    for i in items]
    raw["optim"] = _optim({**defaults, **raw.get("optim", {})}, f"stage {name!r} optim")
    return _build(StageConfig, raw, f"stage {name!r}")


def _optim(raw: dict, where: str) -> OptimConfig:
    raw = dict(raw)
    if "betas" in raw:
        raw["betas"] = tuple(raw["betas"])
    return _build(OptimConfig, raw, where)


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise TrainingError(f"[{where}] must be a table")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise TrainingError(f"[{where}] unknown field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise TrainingError(f"[{where}] {exc}") from None


def parse_value(text: str) -> Any:
    """A TOML value ('3', '1e-3', 'true', '[1, 2]', '"x"'), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in the raw TOML dict; list indices are numbers, ``*`` means every element."""
    if "=" not in item:
        raise TrainingError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    value = parse_value(text.strip())
    if parts[0] in ("run", "optim", "model", "moe", "lora", "stages"):
        pass
    elif len(parts) == 1:
        parts = ["run"] + parts  # bare keys are run fields: --set out=runs/x
    _set(raw, parts, value, key)


def _set(node: Any, parts: list[str], value: Any, key: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if head == "*":
            targets = node
        else:
            try:
                targets = [node[int(head)]]
            except (ValueError, IndexError):
                raise TrainingError(f"--set {key}: no element {head!r} (have {len(node)})") from None
        for target in targets:
            if not rest:
                raise TrainingError(f"--set {key}: cannot replace a whole list element")
            _set(target, rest, value, key)
        return
    if not isinstance(node, dict):
        raise TrainingError(f"--set {key}: {head!r} is not inside a table")
    if not rest:
        node[head] = value
        return
    _set(node.setdefault(head, [] if rest[0].isdigit() or rest[0] == "*" else {}), rest, value, key)


def recipe_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
