"""Quantized checkpoints: safetensors + config.json, loaded directly (no re-quantization, no pickle).

A directory written by ``save_quantized`` (or ``qwenlab quantize``) holds config.json with

    "quantization_config": {"quant_method": "qwenlab", "method": "int8" | "int4", "group_size": G | null,
                            "int4_mins": true}   # int4 only

and model.safetensors whose tensors are the model's state dict in our module names: each quantized
Linear / embedding ``X.weight`` becomes ``X.qweight`` + ``X.scales`` (int4: + ``X.mins``; see
``qwenlab.quant`` for the layouts), stacked MoE experts are ``...experts.gate_up_proj_qweight`` /
``_scales`` / ``_mins`` and ``down_proj_*``,
everything else (norms, biases, routers) keeps its Hugging Face name and dtype. A tied LM head is not
stored. ``qwenlab.load_model`` recognises the config key and calls ``load_quantized``.

int4 checkpoints written before the asymmetric format (no ``int4_mins`` key, no ``mins`` tensors: codes
q + 8 with w = scale * (code - 8)) load exactly: their mins are -8 * scale.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError

QUANT_METHOD = "qwenlab"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "generation_config.json")


def quantization_config(config) -> dict | None:
    """The config's qwenlab quantization entry, or None for an ordinary checkpoint."""
    entry = config.extra.get("quantization_config")
    if not isinstance(entry, dict):
        return None
    if entry.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"quantization_config.quant_method {entry.get('quant_method')!r} is not supported "
                              f"(qwenlab reads its own '{QUANT_METHOD}' int8/int4 checkpoints and GGUF files)")
    return entry


def save_quantized(model, directory: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Write a quantized model; ``source`` (a checkpoint directory) donates tokenizer and generation files."""
    from ..checkpoint import default_generation_config

    if getattr(model, "quantization", None) is None:
        raise CheckpointError("save_quantized: the model is not quantized (call quantize_model first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()
               if not (tied and name.startswith("lm_head."))}
    for old in list(directory.glob("model*.safetensors")) + [directory / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt", "quantization": "qwenlab"})
    dtype = str(model.model.norm.weight.dtype).replace("torch.", "")
    extra = {**model.config.extra, "quantization_config": dict(model.quantization)}
    model.config.replace(torch_dtype=dtype, extra=extra).save(directory)
    copied = False
    if source is not None and Path(source).is_dir():
        for name in COPIED_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, directory / name)
                copied |= name == "generation_config.json"
    if not copied:
        gen = default_generation_config(model.config)
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return directory


def load_quantized(directory: Path, config, dtype: torch.dtype, device="cpu", progress: bool | None = None):
    """Build the quantized model of ``config`` and read its tensors (names and shapes checked)."""
    from ..checkpoint import _execute, checkpoint_tensors
    from ..model.qwen import QwenForCausalLM
    from . import _retie, quantize_model

    entry = quantization_config(config)
    with torch.device("meta"):
        model = QwenForCausalLM(config).to(dtype=dtype)
        quantize_model(model, entry.get("method"), entry.get("group_size"), structure_only=True)
    model = model.to_empty(device=device)
    _retie(model)
    targets = {name: t for name, t in model.state_dict(keep_vars=True).items()
               if not (config.tie_word_embeddings and name.startswith("lm_head."))}
    targets = {name: t for name, t in targets.items() if not name.endswith("rotary.inv_freq")}
    legacy_int4 = entry.get("method") == "int4" and not entry.get("int4_mins")
    if legacy_int4:  # symmetric int4 from before the mins: derived below, not read
        targets = {name: t for name, t in targets.items() if not name.endswith("mins")}
    plan = []
    for name, entry_ in checkpoint_tensors(directory).items():
        target = targets.pop(name, None)
        if target is None:
            raise CheckpointError(f"{entry_.file}: unexpected tensor {name!r} in a {entry['method']} checkpoint")
        if tuple(target.shape) != entry_.shape or target.dtype != entry_.dtype:
            raise CheckpointError(f"{entry_.file}: tensor {name!r} is {entry_.dtype} {list(entry_.shape)}, "
                                  f"expected {target.dtype} {list(target.shape)} for {entry['method']}")
        plan.append((entry_, target.data))
    if targets:
        missing = sorted(targets)
        raise CheckpointError(f"{directory}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    _execute(plan, progress)
    if legacy_int4:
        _derive_legacy_mins(model)
    _retie(model)
    return model.eval()


@torch.no_grad()
def _derive_legacy_mins(model) -> None:
    """Symmetric int4 (codes q + 8, w = scale * (code - 8)) in the asymmetric layout: min = -8 * scale
    (exact in float16)."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if name.endswith("mins"):
                scales = getattr(module, name[: -len("mins")] + "scales")
                buffer.copy_((scales.float() * -8).to(buffer.dtype))
    model.quantization["int4_mins"] = True
