"""Mixture of experts: router, experts with sorted dispatch + grouped matmul, load-balancing loss.

Routing matches transformers (qwen-architecture.md §3): router logits in the activation dtype, softmax
in fp32 over all experts, top-k, optional renormalisation, weights cast back. Token slots are sorted by
expert so each expert reads one contiguous slice; the matmuls run as one grouped GEMM where the device
and dtype support it, else as a loop over the experts that actually received tokens (decode touches
only the experts its tokens route to).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..config import ModelConfig
from . import fused
from .layers import MLP

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# Token slots per active expert below which the plain loop is used instead of one grouped GEMM. Measured on
# this project's 2-core CPU (bf16, Qwen3-30B-A3B widths, process CPU time): the grouped GEMM is as fast as
# the loop at 1 and 512 tokens and 1.2-6x faster at 8-64 tokens, so it is used whenever it runs.
GROUPED_MM_MIN_SLOTS = 1


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, counts: list[int], offsets: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` grouped by expert (sizes ``counts``) times each expert's ``weight[e]`` [out, in].

    Under CUDA autocast the product runs in the autocast dtype, as ``F.linear`` would: autocast does not
    cover grouped_mm or ``mm(out=)``, and without the cast a bf16-autocast training step (float32 master
    weights) would run its experts as a loop of float32 matmuls."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
    active = [e for e, c in enumerate(counts) if c]
    if _use_grouped_mm(x, weight, len(active)):
        return _grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ExpertLoopMatmul.apply(x, weight, counts)
    return _expert_loop(x, weight, counts)


def _expert_loop(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, count in enumerate(counts):
        if count:
            torch.mm(x[start:start + count], weight[e].t(), out=out[start:start + count])
            start += count
    return out


class _ExpertLoopMatmul(torch.autograd.Function):
    """The expert loop with a hand-written backward (training). Autograd through slices would build a
    full-size zero gradient of ``x`` and of the stacked weight for *every* expert (E^2 memory traffic)."""

    @staticmethod
    def forward(ctx, x, weight, counts):
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return _expert_loop(x, weight, counts)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = torch.zeros_like(weight) if want_w else None
        start = 0
        for e, count in enumerate(ctx.counts):
            if count:
                rows = slice(start, start + count)
                if want_x:
                    torch.mm(grad_out[rows], weight[e], out=grad_x[rows])
                if want_w:
                    torch.mm(grad_out[rows].t(), x[rows], out=grad_w[e])
                start += count
        return grad_x, grad_w, None


class _ExpertsFFN(torch.autograd.Function):
    """Training on CPU: gather the token slots by expert, SwiGLU experts, routing weights, scatter back, all
    in one Function with a hand-written backward (grouped matmuls over the contiguous per-expert slices of
    the sorted slots, or a loop of matmuls where torch has no grouped_mm). The routing weight scales the
    [slots, I] activation before the down projection (then its gradient is a dot over I). Same math as the
    composition; measured ~10-15% less time per MoE layer than autograd through it.

    With the compiled kernels (float32): SwiGLU is one vector pass each way, the backward recomputing silu
    from the kept [slots, 2I] gate/up products; the grouped matmuls are one compiled call each; activations
    and gradients live in buffers reused from step to step (``fused.POOL``: no page faults, ~7,000 a step of
    the MoE benchmark model before). Without them the [slots, I] intermediates are kept and the backward uses
    the fused silu_backward kernel."""

    @staticmethod
    def forward(ctx, x, slot_weights, gate_up, down, token_of_slot, counts, offsets):
        inter, (slots, hidden) = down.shape[2], (token_of_slot.shape[0], x.shape[1])
        ops = fused.cpu_kernels() if _all_float32(x, slot_weights, gate_up, down) else None
        pool = _Buffers(x) if ops is not None else None
        xs = _gather_rows(x, token_of_slot, pool and pool("xs", (slots, hidden)))
        gu = _grouped(xs, gate_up.transpose(1, 2), counts, offsets, pool and pool("gu", (slots, 2 * inter)), ops)
        if ops is not None:  # silu, the product and the routing weight in one vector pass
            weighted = pool("weighted", (slots, inter))
            ops.swiglu_train_forward(gu, slot_weights.contiguous(), weighted)
            silu_gate = act = None
        else:
            silu_gate = F.silu(gu[:, :inter])
            act = silu_gate * gu[:, inter:]
            weighted = act * slot_weights[:, None]
        ys = _grouped(weighted, down.transpose(1, 2), counts, offsets, pool and pool("ys", (slots, hidden)), ops)
        ctx.save_for_backward(xs, gu, silu_gate, act, weighted, slot_weights, gate_up, down, token_of_slot, offsets)
        ctx.counts = counts
        out = pool("out", x.shape).zero_() if pool else torch.zeros_like(x)
        return out.index_add_(0, token_of_slot, ys)

    @staticmethod
    def backward(ctx, grad_out):
        xs, gu, silu_gate, act, weighted, slot_weights, gate_up, down, token_of_slot, offsets = ctx.saved_tensors
        counts, inter = ctx.counts, down.shape[2]
        ops = fused.cpu_kernels() if _all_float32(gu, slot_weights, gate_up, down) else None
        pool = _Buffers(xs) if ops is not None else None
        grad_out = grad_out.contiguous()
        gys = _gather_rows(grad_out, token_of_slot, pool and pool("gys", xs.shape))
        grad_down = (_grouped_weight_grad(gys, weighted, counts, offsets, pool and pool("grad_down", down.shape), ops)
                     if ctx.needs_input_grad[3] else None)
        grad_act = _grouped(gys, down, counts, offsets, pool and pool("grad_act", weighted.shape), ops)
        if ops is not None:  # both halves of grad_gu and the routing weights' gradient in one pass
            grad_gu = pool("grad_gu", gu.shape)
            grad_weights = ops.swiglu_train_backward(grad_act, gu, slot_weights.contiguous(), grad_gu)
        else:
            gate, up = gu[:, :inter], gu[:, inter:]
            grad_weights = torch.linalg.vecdot(grad_act, act, dim=-1) if ctx.needs_input_grad[1] else None
            grad_act.mul_(slot_weights[:, None])
            grad_gu = torch.empty_like(gu)
            torch.mul(grad_act, silu_gate, out=grad_gu[:, inter:])
            torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=grad_gu[:, :inter])
        grad_gate_up = (_grouped_weight_grad(grad_gu, xs, counts, offsets, pool and pool("grad_gate_up", gate_up.shape),
                                             ops)
                        if ctx.needs_input_grad[2] else None)
        grad_xs = _grouped(grad_gu, gate_up, counts, offsets, pool and pool("grad_xs", xs.shape), ops)
        grad_x = pool("grad_x", grad_out.shape).zero_() if pool else torch.zeros_like(grad_out, dtype=xs.dtype)
        grad_x.index_add_(0, token_of_slot, grad_xs)
        return grad_x, grad_weights, grad_gate_up, grad_down, None, None, None


def _gather_rows(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """x[index] (a row gather; F.embedding measured 2x faster than advanced indexing), into ``out`` if given."""
    return torch.index_select(x, 0, index, out=out) if out is not None else F.embedding(index, x)


def _all_float32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 for t in tensors)


def _Buffers(like: torch.Tensor):
    """Reused CPU buffers (fused.POOL) for the experts' activations and gradients, keyed by their role."""
    return lambda role, shape: fused.POOL.empty("experts." + role, shape, like.dtype, like.device)


def _grouped(x: torch.Tensor, weight: torch.Tensor, counts: list[int], offsets: torch.Tensor,
             out: torch.Tensor | None = None, ops=None) -> torch.Tensor:
    """Row slices of ``x`` (sizes ``counts``) times ``weight[e]`` ([in, out] per expert, any strides); into
    ``out`` when given (grouped_mm has no out= form): by the compiled kernels' ``grouped_mm_rows`` where
    ``ops`` is given, else a loop of matmuls."""
    if out is None and _grouped_ok(x):
        return _grouped_mm(x, weight, offs=offsets)
    if out is None:
        out = x.new_empty(x.shape[0], weight.shape[2])
    if ops is not None:
        ops.grouped_mm_rows(x, weight, counts, out)
        return out
    for e, rows in _expert_rows(counts):
        torch.mm(x[rows], weight[e], out=out[rows])
    return out


def _grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, counts: list[int], offsets: torch.Tensor,
                         out: torch.Tensor | None = None, ops=None) -> torch.Tensor:
    """Per-expert grad.T @ x over each expert's row slice: [E, grad cols, x cols] (zeros for idle experts);
    into ``out`` when given (by ``ops.grouped_mm_weights`` where ``ops`` is given)."""
    if out is None and _grouped_ok(x):
        return _grouped_mm(grad.t(), x, offs=offsets)
    if out is None:
        out = grad.new_empty(len(counts), grad.shape[1], x.shape[1])
    if ops is not None:
        ops.grouped_mm_weights(grad, x, counts, out)
        return out
    for e, count in enumerate(counts):
        if not count:
            out[e].zero_()
    for e, rows in _expert_rows(counts):
        torch.mm(grad[rows].t(), x[rows], out=out[e])
    return out


def _grouped_ok(x: torch.Tensor) -> bool:
    # torch.compile's fake-tensor grouped_mm accepts bfloat16 only: traced code takes the loop
    return _grouped_mm is not None and x.dtype in (torch.float32, torch.bfloat16) and not torch.compiler.is_compiling()


def _expert_rows(counts: list[int]):
    start = 0
    for e, count in enumerate(counts):
        if count:
            yield e, slice(start, start + count)
            start += count


def _use_grouped_mm(x: torch.Tensor, weight: torch.Tensor, active: int) -> bool:
    if _grouped_mm is None or x.shape[0] < GROUPED_MM_MIN_SLOTS * max(active, 1):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_ids, weights [N, k] -> [N, H] = sum_j weights[:, j] * expert_{ids[:, j]}(x)."""
        k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        order = flat.argsort(stable=True)
        token_of_slot = order // k
        counts_t = torch.bincount(flat, minlength=self.num_experts)
        counts = counts_t.tolist()
        offsets = counts_t.cumsum(0).to(torch.int32)
        if x.device.type == "cpu" and fused.wants_fused(x, weights, self.gate_up_proj, self.down_proj):
            slot_weights = weights.reshape(-1).index_select(0, order)
            return _ExpertsFFN.apply(x, slot_weights, self.gate_up_proj, self.down_proj, token_of_slot, counts, offsets)
        xs = x[token_of_slot]
        gate, up = expert_matmul(xs, self.gate_up_proj, counts, offsets).chunk(2, dim=-1)
        ys = expert_matmul(F.silu(gate) * up, self.down_proj, counts, offsets)
        ys = ys * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of_slot, ys.to(x.dtype))


class SparseMoE(nn.Module):
    """Qwen3-MoE block; with ``shared_expert_intermediate_size`` also Qwen2-MoE's gated shared expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        if config.has_shared_expert:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (router logits [N, E], expert ids [N, k], weights [N, k] in x's dtype)."""
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if logits.dtype == torch.float32 and logits.requires_grad:
            # training: router_statistics reuses these (the same softmax and top-k of the same logits)
            _ROUTING[logits] = (probs, expert_ids)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, expert_ids, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, expert_ids, weights = self.route(x)
        out = self.experts(x, expert_ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape), logits


# ---- load-balancing loss ---------------------------------------------------------------------------
# Router logits -> (probabilities, top-k expert ids) computed by SparseMoE.route in float32 training: the
# balancing statistics would compute the same softmax and top-k again (and backward through a second softmax).
_ROUTING = WeakIdKeyDictionary()


def router_statistics(router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], top_k: int,
                      attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled over layers: (top-k selections per expert [E], summed router probabilities [E], token rows).

    Sums rather than means, so statistics from several micro-batches and data-parallel ranks can be
    added (or all-reduced) before forming the loss: Qwen's global-batch balancing.
    """
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    selected = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for logits in router_logits:
        cached = _ROUTING.get(logits)
        if cached is not None and cached[1].shape[-1] == top_k:
            probs, chosen = cached
        else:
            probs = F.softmax(logits, dim=-1)
            _, chosen = torch.topk(probs, top_k, dim=-1)
        slot_weight = torch.ones_like(chosen, dtype=torch.float32) if mask is None else mask[:, None].expand_as(chosen)
        selected = selected.scatter_add(0, chosen.reshape(-1), slot_weight.reshape(-1))
        probs = probs.float()
        prob_sum = prob_sum + (probs.sum(0) if mask is None else (probs * mask[:, None]).sum(0))
        rows = rows + (probs.shape[0] if mask is None else mask.sum())
    return selected, prob_sum, rows


def balancing_loss_from_statistics(selected: torch.Tensor, prob_sum: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e; equals top_k when the routing is perfectly balanced."""
    return selected.numel() * torch.sum((selected / rows) * (prob_sum / rows))


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (router logits from every MoE layer, pooled)."""
    if not router_logits:
        return torch.zeros(())
    assert router_logits[0].shape[-1] == num_experts, "router logits do not match num_experts"
    return balancing_loss_from_statistics(*router_statistics(router_logits, top_k, attention_mask))
