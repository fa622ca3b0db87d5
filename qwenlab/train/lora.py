"""LoRA adapters on chosen linear projections: apply, save on their own, load, merge.

``y = W x + b + (alpha / rank) * B(A(dropout(x)))`` with A [rank, in] initialised like nn.Linear
(Kaiming-uniform) and B [out, rank] zero, so a fresh adapter leaves the model unchanged.

A projection keeps its own parameter names (``q_proj.weight``); the adapter adds ``q_proj.lora_A.weight``
and ``q_proj.lora_B.weight``. Adapters are written in PEFT's layout (``adapter_config.json`` and
``adapter_model.safetensors`` with ``base_model.model.`` prefixed names) so PEFT can read them too.
Targets are module names of ``nn.Linear`` layers (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``gate_proj``, ``up_proj``, ``down_proj``, ``lm_head``); the MoE router and the stacked expert tensors
are not adapted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias objects) with a low-rank update."""

    @classmethod
    def wrap(cls, base: nn.Linear, rank: int, alpha: float, dropout: float) -> "LoRALinear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = base.in_features, base.out_features
        module.weight = base.weight
        module.bias = base.bias
        module.rank, module.alpha, module.scaling = rank, alpha, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        module.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        module.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        module.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        module.reset_lora()
        return module

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        bound = 1 / math.sqrt(self.in_features)  # nn.Linear's default init, kaiming_uniform(a=sqrt(5))
        values = torch.rand(self.lora_A.weight.shape, generator=generator) * 2 * bound - bound
        self.lora_A.weight.copy_(values)
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                         device="meta")
        base.weight = self.weight
        base.bias = self.bias
        with torch.no_grad():
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
        return base


def _targets(model: nn.Module, targets: list[str]):
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, nn.Linear) and not isinstance(module, LoRALinear):
            if leaf == "gate":
                continue  # the MoE router
            found.append(name)
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: list[str] = ("q_proj", "k_proj", "v_proj", "o_proj"), seed: int = 0,
               freeze_base: bool = True) -> list[str]:
    """Replace the target projections by LoRALinear; freeze everything else. Returns the adapted names."""
    names = _targets(model, list(targets))
    if "lm_head" in names and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        raise TrainingError("lm_head is tied to the embedding in this model; LoRA on it would change both")
    if not names:
        raise TrainingError(f"no nn.Linear modules named {list(targets)} to adapt")
    if freeze_base:
        for param in model.parameters():
            param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        wrapped = LoRALinear.wrap(model.get_submodule(name), rank, alpha, dropout)
        wrapped.reset_lora(generator)
        _set_module(model, name, wrapped)
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": sorted(set(n.rsplit(".", 1)[-1] for n in names))}
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def save_adapter(state: dict[str, torch.Tensor], lora_config: dict, directory: str | Path,
                 base_model: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) from LoRA tensors."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in state.items() if is_lora_key(k)}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": base_model, **lora_config}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    except FileNotFoundError as exc:
        raise TrainingError(f"{directory}: not a LoRA adapter ({exc.filename} missing)") from None
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
    return config, state


def load_adapter(model: nn.Module, directory: str | Path, freeze_base: bool = True) -> nn.Module:
    """Apply the adapter's LoRA layers to ``model`` (in place) and load their weights."""
    config, state = read_adapter(directory)
    apply_lora(model, rank=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
               targets=config["target_modules"], freeze_base=freeze_base)
    load_lora_state(model, state, where=str(directory))
    return model


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "adapter") -> None:
    params = lora_state_dict(model)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise TrainingError(f"{where}: adapter does not match the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise TrainingError(f"{where}: {name} has shape {list(state[name].shape)}, expected "
                                    f"{list(param.shape)}")
            param.copy_(state[name])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain nn.Linear modules (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_module(model, name, module.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def merge_to_checkpoint(base: str | Path, adapter: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """``qwenlab lora merge``: base checkpoint + adapter -> a full HF checkpoint (tokenizer files copied)."""
    from ..checkpoint import load_model, save_model
    from .checkpointing import copy_tokenizer_files

    model = load_model(base, dtype=torch.float32)
    load_adapter(model, adapter)
    merge_lora(model)
    out = save_model(model, out, dtype=dtype or model.config.torch_dtype)
    copy_tokenizer_files(Path(base), out)
    return out
