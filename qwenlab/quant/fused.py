"""The engine's fused decoder pieces for quantized models (CPU): attention inputs and SwiGLU MLP.

A bf16 model in the engine runs each layer's q/k/v projections + q/k RMSNorm + RoPE as one kernel call
(``qwenlab.engine.kernels``) and its MLP as another. ``use_quant_kernels(model)`` gives a quantized model
the same structure with ``qwenlab.quant.kernels``: int8 or int4 weights are read once per token, the
projections of a call share one parallel region, and the small element-wise work (norms, RoPE, SwiGLU)
runs in C++ instead of separate stock ops. Layers whose projections are not all quantized, prefill-sized
inputs (more than ``PREFILL_ROWS`` tokens, where the dequantizing matmul wins), autograd and other devices
fall back to the stock forward.

On top of that, a dense quantized model in the engine runs whole decode steps in one kernel call
(``QuantDecodePlan``, like the engine's bf16 ``FusedDecode``): the model hands the kernels its weights and
KV caches once, and each step whose rows are all single-token decodes needing logits is then one call
(embedding, every layer, final norm, LM head), with no Python between the layers. ``QWENLAB_FUSED_DECODE=0``
turns it off (the module route above then runs).
"""

from __future__ import annotations

import os

import torch

from ..engine import huge_pages
from ..model.layers import MLP, Attention
from ..model.qwen import QwenForCausalLM
from . import PREFILL_ROWS, QuantEmbedding, QuantLinear
from . import kernels as quant_kernels

_ACTIVATIONS = (torch.float32, torch.bfloat16)


def _fast(x: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled() and x.dtype in _ACTIVATIONS and x.device.type == "cpu"
            and 0 < x.numel() // x.shape[-1] <= PREFILL_ROWS)


class QuantKernelAttention(Attention):
    """Attention whose quantized q/k/v projections, q/k norms and RoPE run as one kernel call."""

    def forward(self, x, cos, sin, context):
        if x.shape[0] != 1 or not _fast(x):
            return super().forward(x, cos, sin, context)
        B, S, _ = x.shape
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm is not None else (None, None, 1e-6)
        q, k, v = quant_kernels._module.attention_inputs(
            x, self.q_proj.parts(), self.k_proj.parts(), self.v_proj.parts(), self.q_proj.bias, self.k_proj.bias,
            self.v_proj.bias, norms[0], norms[1], cos, sin, norms[2], self.num_heads, self.num_kv_heads,
            self.head_dim)
        out = context.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class QuantKernelMLP(MLP):
    """SwiGLU MLP with quantized projections in one kernel call."""

    def forward(self, x):
        if _fast(x):
            return quant_kernels._module.mlp(x, self.gate_proj.parts(), self.up_proj.parts(), self.down_proj.parts())
        if torch.is_grad_enabled() or x.dtype not in _ACTIVATIONS or x.device.type != "cpu":
            return super().forward(x)
        # prefill: the projections' float32 products go straight into one SwiGLU pass (rounded like the stock
        # bf16 ops) and on to the down projection, without bf16 copies of the [T, I] products in between
        xf = x.float()
        act = quant_kernels._module.swiglu(self.gate_proj(xf), self.up_proj(xf), x.dtype == torch.bfloat16)
        return self.down_proj(act).to(x.dtype)


def use_quant_kernels(model: torch.nn.Module) -> int:
    """Route a quantized CPU model's attention and MLP modules through the fused kernels; returns how many."""
    if quant_kernels.load() is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is Attention:
            projections = (module.q_proj, module.k_proj, module.v_proj)
            kind = QuantKernelAttention
        elif type(module) is MLP:
            projections = (module.gate_proj, module.up_proj, module.down_proj)
            kind = QuantKernelMLP
        else:
            continue
        if not all(isinstance(p, QuantLinear) and p.qweight.device.type == "cpu" for p in projections):
            continue
        module.__class__ = kind
        count += 1
    if count:
        move_to_huge_pages(model)  # before any plan takes the weights' addresses
    if type(model) is QwenForCausalLM and os.environ.get("QWENLAB_FUSED_DECODE", "1") != "0":
        model.__class__ = QuantPlanModel  # whole decode steps in one call where the plan covers the model
    return count


def move_to_huge_pages(model: torch.nn.Module, min_bytes: int = 1 << 18) -> int:
    """Move a CPU model's large parameters and buffers (a quantized model's weights are buffers:
    ``qweight``, ``scales``, ``mins``) onto transparent huge pages, as the engine does for bf16 weights
    (``qwenlab.engine.huge_pages``: no TLB miss and prefetcher restart every 4 KiB of each weight stream).
    Values, shapes, dtypes and ties (one tensor in two modules) are kept; returns how many tensors moved."""
    if not huge_pages.enabled():
        return 0
    slots: dict[int, list] = {}  # data_ptr -> [tensor, [(module, kind, name), ...]]
    for module in model.modules():
        for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
            for name, t in table.items():
                if (t is None or t.device.type != "cpu" or not t.is_contiguous()
                        or t.numel() * t.element_size() < min_bytes):
                    continue
                slots.setdefault(t.data_ptr(), [t, []])[1].append((module, kind, name))
    if not slots:
        return 0
    items = list(slots.values())
    slots.clear()
    sizes = [-(-t.numel() * t.element_size() // 4096) * 4096 for t, _ in items]
    import mmap

    try:
        mapping = mmap.mmap(-1, sum(sizes) + huge_pages.HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return 0
    arena = torch.frombuffer(mapping, dtype=torch.uint8)
    offset = (-arena.data_ptr()) % huge_pages.HUGE_PAGE
    with torch.no_grad():
        for i, size in enumerate(sizes):
            (tensor, owners), items[i] = items[i], None  # the old copy goes when its owners let go
            nbytes = tensor.numel() * tensor.element_size()
            target = arena[offset:offset + nbytes]
            target.copy_(tensor.reshape(-1).view(torch.uint8))
            moved = target.view(tensor.dtype).view(tensor.shape)
            for module, kind, name in owners:
                if kind == "param":
                    module._parameters[name].data = moved
                else:
                    module._buffers[name] = moved
            offset += size
            del tensor, owners
            huge_pages._trim()
    return len(items)


MAX_PLAN_ROWS = 64  # decode rows per step through the plan


class QuantDecodePlan:
    """A quantized dense model's weights and KV caches, handed to ``plan_create`` once."""

    def __init__(self, module, model, kv_caches):
        self.module = module
        self.model = model
        empty = torch.empty(0)

        def weight(linear):
            parts = linear.parts()
            return parts if len(parts) == 3 else [*parts, empty]

        def opt(t):
            return t if t is not None else empty

        tensors: list[torch.Tensor] = []
        for layer, (k_cache, v_cache) in zip(model.model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            norms = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (empty, empty)
            tensors += [layer.input_layernorm.weight, *weight(attn.q_proj), *weight(attn.k_proj),
                        *weight(attn.v_proj), opt(attn.q_proj.bias), opt(attn.k_proj.bias), opt(attn.v_proj.bias),
                        *norms, *weight(attn.o_proj), opt(attn.o_proj.bias), layer.post_attention_layernorm.weight,
                        *weight(mlp.gate_proj), *weight(mlp.up_proj), *weight(mlp.down_proj), k_cache, v_cache]
        config, first = model.config, model.model.layers[0].self_attn
        embed = model.model.embed_tokens
        embed_parts = [embed.qweight, embed.scales, embed.mins if embed.method == "int4" else empty]
        qk_eps = first.q_norm.eps if first.q_norm is not None else 1e-6
        dims = [config.hidden_size, first.num_heads, first.num_kv_heads, first.head_dim, config.intermediate_size,
                config.vocab_size]
        self.dtype = model.model.norm.weight.dtype
        self.kv_caches = kv_caches
        self.plan = module.plan_create(tensors, embed_parts, model.model.norm.weight, weight(model.lm_head), dims,
                                       model.model.norm.eps, qk_eps, first.scale, self.dtype == torch.bfloat16)

    def __del__(self):
        try:
            self.module.plan_free(self.plan)
        except Exception:  # interpreter shutdown
            pass

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        cos, sin = self.model.model.rotary(positions, self.dtype)
        return self.module.plan_run(self.plan, input_ids, cos, sin, meta.slot_mapping, meta.decode_block_tables,
                                    meta.decode_context_lens)


def plan_covers(model, kv_caches) -> bool:
    """Whether ``QuantDecodePlan`` runs this model: dense, every projection and the embedding / LM head
    quantized on CPU, bf16 or float32 activations with caches of the same dtype, uniform norm epsilons."""
    inner = getattr(model, "model", None)
    if inner is None or len(inner.layers) != len(kv_caches) or quant_kernels.load() is None:
        return False
    dtype = inner.norm.weight.dtype
    if dtype not in _ACTIVATIONS or inner.norm.weight.device.type != "cpu":
        return False
    if not isinstance(inner.embed_tokens, QuantEmbedding) or not isinstance(model.lm_head, QuantLinear):
        return False
    if model.lm_head.bias is not None:
        return False
    for layer, (k_cache, v_cache) in zip(inner.layers, kv_caches):
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not QuantKernelAttention or type(mlp) is not QuantKernelMLP:
            return False
        if attn.num_heads * attn.head_dim != attn.q_proj.out_features:  # e.g. a tensor-parallel shard
            return False
        if k_cache.dtype != dtype or v_cache.dtype != dtype or k_cache.device.type != "cpu":
            return False
        if any(p.dtype != dtype for p in layer.parameters()):
            return False
    norms = [inner.norm.eps] + [n.eps for layer in inner.layers
                                for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    qk = [n.eps for layer in inner.layers for n in (layer.self_attn.q_norm, layer.self_attn.k_norm) if n is not None]
    return len(set(norms)) == 1 and len(set(qk)) <= 1


class QuantPlanModel(QwenForCausalLM):
    """A quantized model whose engine decode steps (all rows single-token, all sampled) run through a
    ``QuantDecodePlan``; everything else takes the module route. Same parameters and state dict."""

    def forward(self, input_ids, positions=None, context=None, logits_indices=None, output_router_logits=False,
                loss_targets=None):
        meta = getattr(context, "meta", None)
        if (meta is not None and logits_indices is not None and not output_router_logits and loss_targets is None
                and not torch.is_grad_enabled() and not meta.prefill_rows and meta.decode_token_index is not None
                and 0 < input_ids.numel() == logits_indices.numel() == len(meta.decode_rows) <= MAX_PLAN_ROWS):
            plan = self._decode_plan(context.kv_caches)
            if plan is not None:
                return plan.run(input_ids.reshape(-1), positions.reshape(-1), meta)
        return super().forward(input_ids, positions, context, logits_indices, output_router_logits, loss_targets)

    def _decode_plan(self, kv_caches):
        cached = self.__dict__.get("_quant_plan")
        if cached is not None and cached[0] is kv_caches:
            return cached[1]
        plan = QuantDecodePlan(quant_kernels.load(), self, kv_caches) if plan_covers(self, kv_caches) else None
        self.__dict__["_quant_plan"] = (kv_caches, plan)
        return plan
