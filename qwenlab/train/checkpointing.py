"""Run checkpoints: written atomically, the last N kept, everything needed to resume exactly.

::

    RUN/checkpoints/step-00000040/
        model/               HF layout in the training dtype (config.json, safetensors, tokenizer files)
        adapter/             instead of model/ for LoRA runs (PEFT layout; the base is the recipe's model)
        optimizer.pt         full (unsharded) optimizer state, read back with weights_only=True
        trainer_state.json   stage, steps, data-loader state, recipe fingerprint

A checkpoint is assembled in ``.tmp-step-…`` and renamed into place only when complete (files and the
directory fsync'ed first), so a crash or SIGKILL while writing leaves the previous checkpoint as the
latest one; leftovers of an interrupted write are removed by the next save. Random state is not saved:
every step reseeds from (seed, step, rank).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import TrainingError
from . import distributed as D
from .lora import is_lora_key, save_adapter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "special_tokens_map.json", "added_tokens.json")
STEP_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def copy_tokenizer_files(source: Path | None, target: Path) -> None:
    if source is None or not Path(source).is_dir():
        return
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(target) / name)


def write_hf_checkpoint(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path,
                        dtype: str | torch.dtype | None = None, tokenizer_dir: Path | None = None) -> Path:
    """An HF checkpoint from a full state dict (FQN -> tensor), without a second copy of the weights."""
    from ..checkpoint import save_model
    from ..model.qwen import QwenForCausalLM

    with torch.device("meta"):
        model = QwenForCausalLM(config)
    state = {k: v for k, v in state.items() if not is_lora_key(k)}
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    out = save_model(model, directory, dtype=dtype)
    copy_tokenizer_files(tokenizer_dir, out)
    return out


def merge_lora_state(state: dict[str, torch.Tensor], lora_config: dict) -> dict[str, torch.Tensor]:
    """Fold ``X.lora_A/B.weight`` into ``X.weight`` in a full state dict (float32 arithmetic)."""
    scaling = lora_config["lora_alpha"] / lora_config["r"]
    merged = {k: v for k, v in state.items() if not is_lora_key(k)}
    for key in state:
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            a, b = state[key].float(), state[f"{prefix}.lora_B.weight"].float()
            weight = merged[f"{prefix}.weight"]
            merged[f"{prefix}.weight"] = (weight.float() + (b @ a) * scaling).to(weight.dtype)
    return merged


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointManager:
    def __init__(self, run_dir: Path, info: D.DistInfo, keep_last: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.info, self.keep_last = info, keep_last

    def complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and STEP_RE.match(p.name)
                      and (p / STATE_FILE).is_file())

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, step: int, model, optimizer, trainer_state: dict, config: ModelConfig,
             lora_config: dict | None = None, tokenizer_dir: Path | None = None) -> Path:
        """Collective: every rank calls it; rank 0 writes."""
        model_state = D.full_model_state(model, self.info, trainable_only=lora_config is not None)
        optim_state = D.full_optimizer_state(model, optimizer, self.info)
        final = self.dir / f"step-{step:08d}"
        if self.info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = self.dir / f".tmp-step-{step:08d}"
            tmp.mkdir()
            if lora_config is not None:
                save_adapter(model_state, lora_config, tmp / "adapter")
            else:
                write_hf_checkpoint(model_state, config, tmp / "model", tokenizer_dir=tokenizer_dir)
            torch.save(optim_state, tmp / OPTIMIZER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
            _fsync_tree(tmp)
            if final.exists():  # a re-run of the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            self.prune()
        D.barrier(self.info)
        return final

    def prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> dict:
        try:
            return json.loads((path / STATE_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise TrainingError(f"{path}: unreadable checkpoint state ({exc})") from None

    @staticmethod
    def read_optimizer(path: Path) -> dict:
        return torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
