"""Scale-out with torch.distributed: a 1-D data-parallel device mesh and FSDP2 (``fully_shard``).

As in torchtitan, parallelism is *applied* to an ordinary single-device model: activation checkpointing
and ``torch.compile`` per decoder layer, then ``fully_shard`` on every decoder layer and on the root
(embedding, final norm and LM head, tied or not, form the root's group). Launched by torchrun::

    torchrun --nproc-per-node 2 -m qwenlab train recipe.toml

gloo on CPU, nccl on CUDA. A single process (no torchrun) skips all of it and trains the plain model.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import TrainingError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    world = world_size_from_env()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise TrainingError(f"run.device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("run.device = 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    info = DistInfo(rank, world, local_rank, dev)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=30))
        info.mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return info


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(value, info: DistInfo):
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- parallelize ----------------------------------------------------------------------------------------
def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward. The layer keeps its name (state-dict keys do not change)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed


def apply_compile(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.compile()


def parallelize(model: nn.Module, info: DistInfo, mixed_precision: str = "none",
                activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if not info.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bfloat16" else None,
                                  reduce_dtype=torch.float32)
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        # the last layer's parameters are gathered again right away by the root's backward: keep them
        fully_shard(layer, mesh=info.mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=info.mesh, mp_policy=policy)
    return model


# ---- full state dicts (rank 0) for checkpoints --------------------------------------------------------------
def full_model_state(model: nn.Module, info: DistInfo, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded CPU tensors on rank 0 (an empty dict elsewhere). Collective: call on every rank."""
    if not info.enabled:
        return {name: p.detach().cpu().clone() for name, p in model.state_dict(keep_vars=True).items()
                if not trainable_only or p.requires_grad}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model: nn.Module, optimizer, info: DistInfo) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def load_full_model_state(model: nn.Module, state: dict, strict: bool = True) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
