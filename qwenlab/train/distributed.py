"""Scale-out with torch.distributed: FSDP2 (``fully_shard``) data parallelism, optionally DTensor tensor
parallelism, on a device mesh.

As in torchtitan, parallelism is *applied* to an ordinary single-device model: tensor parallel first
(``parallelize_module`` on every decoder layer), then activation checkpointing and ``torch.compile`` per
decoder layer, then ``fully_shard`` on every decoder layer and on the root (embedding, final norm and LM
head, tied or not, form the root's group). Launched by torchrun::

    torchrun --nproc-per-node 2 -m qwenlab train recipe.toml

``run.tensor_parallel = T`` splits the world into ``W / T`` data-parallel groups of ``T`` tensor-parallel
ranks: a 2-D mesh ("dp", "tp"), ranks of one tp group adjacent (same node), FSDP2 on "dp" only when it has
more than one rank. Under TP each rank of a tp group sees the same rows; the data is split by dp rank.
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
from .recipes import check_world


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # the data-parallel mesh FSDP2 shards over ("dp"; a sub-mesh under TP)
    tp: int = 1  # tensor-parallel ranks per data-parallel group
    tp_mesh: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: how many different slices of every global batch are trained at once."""
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def fsdp(self) -> bool:
        return self.dp_size > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto", tensor_parallel: int = 1) -> DistInfo:
    """Join the process group torchrun set up (if any), pick this rank's device, build the device mesh."""
    world = world_size_from_env()
    check_world(world, tensor_parallel)
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
    info = DistInfo(rank, world, local_rank, dev, tp=tensor_parallel)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=30))
        if tensor_parallel == 1:
            info.mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
        else:
            mesh = init_device_mesh(dev.type, (world // tensor_parallel, tensor_parallel),
                                    mesh_dim_names=("dp", "tp"))
            info.mesh, info.tp_mesh = mesh["dp"], mesh["tp"]
    return info


def check_tensor_parallel(config, tensor_parallel: int) -> None:
    """Refuse a model whose attention heads or MLP width cannot be split evenly over ``tensor_parallel`` ranks."""
    if tensor_parallel == 1:
        return
    sizes = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    if any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        sizes["intermediate_size"] = config.intermediate_size
    bad = {name: value for name, value in sizes.items() if value % tensor_parallel}
    if bad:
        listed = ", ".join(f"{name} = {value}" for name, value in bad.items())
        raise TrainingError(f"run.tensor_parallel = {tensor_parallel} must divide the model's {listed} "
                            f"(heads and MLP columns are split evenly over the tensor-parallel ranks)")


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over the data-parallel ranks (the ranks of one tensor-parallel group hold the same values)."""
    if info.dp_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=info.mesh.get_group() if info.tp > 1 else None)
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


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron-style TP of every decoder layer through DTensor (as torchtitan does for Llama / Qwen).

    q/k/v and gate/up are split by output columns (ColwiseParallel: each rank computes heads / T of the
    heads and intermediate / T of the MLP width), o_proj and down_proj by input rows (RowwiseParallel: a
    partial sum all-reduced to the full hidden state). The attention module reads the local head count off
    the projected tensor. QK-norm is per head: its weight stays whole and replicated on every rank
    (a replicated DTensor, so its gradient, a sum over the local heads, is reduced over the tp ranks).
    Embedding, final norm, LM head, the other norms and MoE blocks (router, experts, shared expert) stay
    replicated: every tp rank computes them in full on the same rows, so their gradients already agree.
    """
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    for layer in model.model.layers:
        plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel()}
        if layer.self_attn.q_norm is not None:
            # input [B, S, local heads, head_dim]: a DTensor sharded on the head axis, weight replicated
            plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if hasattr(layer.mlp, "gate_proj"):  # dense SwiGLU (MoE blocks stay replicated)
            plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                         "mlp.down_proj": RowwiseParallel()})
        parallelize_module(layer, tp_mesh, plan)


def _reduce_partial_grads(model: nn.Module) -> None:
    """TP without FSDP: a replicated weight applied to head-sharded activations (QK-norm) receives a partial
    gradient (the sum over this rank's heads). DTensor would reduce it lazily wherever it is used (grad norm,
    AdamW); reduce it once, as soon as it is accumulated, so that ``.grad`` always holds the full gradient.
    (FSDP2 does the same redistribution itself before its reduce-scatter.)"""
    from torch.distributed.tensor import DTensor, Replicate

    def reduce(param):
        grad = param.grad
        if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
            param.grad = grad.redistribute(placements=[Replicate()] * grad.device_mesh.ndim)

    for name, param in model.named_parameters():
        if isinstance(param, DTensor) and all(p.is_replicate() for p in param.placements):
            param.register_post_accumulate_grad_hook(reduce)


def mesh_key(tensor: torch.Tensor):
    """The device mesh a (DTensor) parameter or gradient lives on; None for a plain tensor. Fused / foreach
    kernels (AdamW, norms) need lists of tensors on one mesh."""
    mesh = getattr(tensor, "device_mesh", None)
    return None if mesh is None else (mesh.mesh_dim_names, tuple(mesh.mesh.flatten().tolist()))


def parallelize(model: nn.Module, info: DistInfo, mixed_precision: str = "none",
                activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    if info.tp > 1:
        check_tensor_parallel(model.config, info.tp)
        apply_tensor_parallel(model, info.tp_mesh)
        if not info.fsdp:
            _reduce_partial_grads(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if not info.fsdp:
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
