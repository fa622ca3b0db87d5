"""Batch decode of a dense bf16 model on CPU in one kernel call per step (``decode_plan_run`` in kernels.py).

A decode step of a small model is ~28 layers x 7 matrix-vector products, each a few hundred microseconds of
memory streaming; around them the module-by-module route spends Python calls, tensor allocations, dtype
conversions and a thread-pool round trip per product. ``FusedDecode`` hands the kernels the model's weights
and KV caches once (a "plan"); each step whose rows are all single-token decodes that need logits then
costs one call: embedding, every layer, final norm and LM head, with the arithmetic and roundings of the
per-module kernels, so the logits are bit-identical to the module route (tests/test_engine_kernels.py).

Used only where it applies: a bf16 CPU model whose every layer runs on the kernels (``use_bf16_kernels``:
KernelAttention / KernelMLP / KernelRMSNorm / KernelLinear, no MoE, not quantized), bf16 KV caches.
Anything else (prefill chunks, mixed steps, MoE, quantized layers, float32) takes the module route.
Where the plan applies, the weights are first moved onto transparent huge pages (huge_pages.py).
"""

from __future__ import annotations

import torch

from . import kernels
from .huge_pages import move_to_huge_pages

MAX_ROWS = 64  # decode rows per step through the plan (more go the module route, where the BLAS takes over)


class FusedDecode:
    def __init__(self, module, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.module = module
        self.model = model
        config = model.config
        empty = torch.empty(0)
        tensors: list[torch.Tensor] = []
        for layer, (k_cache, v_cache) in zip(model.model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            norms = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (empty, empty)
            bias = [p.bias if p.bias is not None else empty for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            tensors += [layer.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                        *bias, *norms, attn.o_proj.weight,
                        attn.o_proj.bias if attn.o_proj.bias is not None else empty,
                        layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
                        mlp.down_proj.weight, k_cache, v_cache]
        first = model.model.layers[0].self_attn
        qk_eps = first.q_norm.eps if first.q_norm is not None else 1e-6
        dims = [config.hidden_size, first.num_heads, first.num_kv_heads, first.head_dim, config.intermediate_size,
                config.vocab_size]
        self.plan = module.decode_plan_create(tensors, model.model.embed_tokens.weight, model.model.norm.weight,
                                              model.lm_head.weight, dims, model.model.norm.eps, qk_eps, first.scale)

    @classmethod
    def build(cls, module, model, kv_caches) -> FusedDecode | None:
        """A plan for this model, or None when the model is not one the plan covers."""
        if module is None or not hasattr(module, "decode_plan_run") or not _covered(model, kv_caches):
            return None
        move_to_huge_pages(model)  # before the plan takes the weights' addresses
        return cls(module, model, kv_caches)

    def __del__(self):
        try:
            self.module.decode_plan_free(self.plan)
        except Exception:  # interpreter shutdown
            pass

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """Logits [rows, vocab] (bf16) of a step whose rows are all single-token decodes."""
        cos, sin = self.model.model.rotary(positions, torch.bfloat16)
        return self.module.decode_plan_run(self.plan, input_ids, cos, sin, meta.slot_mapping, meta.decode_block_tables,
                                           meta.decode_context_lens)


def _covered(model, kv_caches) -> bool:
    if getattr(model, "quantization", None) is not None:
        return False
    inner = getattr(model, "model", None)
    if inner is None or len(inner.layers) != len(kv_caches) or type(model.lm_head) is not kernels.KernelLinear:
        return False
    if type(inner.norm) is not kernels.KernelRMSNorm or inner.embed_tokens.weight.dtype != torch.bfloat16:
        return False
    for layer, (k_cache, v_cache) in zip(inner.layers, kv_caches):
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not kernels.KernelAttention or type(mlp) is not kernels.KernelMLP:
            return False
        if any(type(n) is not kernels.KernelRMSNorm for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return False
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(lin) is not kernels.KernelLinear for lin in linears):
            return False
        if attn.num_heads * attn.head_dim != attn.q_proj.weight.shape[0]:  # e.g. a tensor-parallel shard
            return False
        params = [p for m in (layer,) for p in m.parameters()]
        if any(p.dtype != torch.bfloat16 or p.device.type != "cpu" for p in params):
            return False
        if k_cache.dtype != torch.bfloat16 or v_cache.dtype != torch.bfloat16:
            return False
    norms = [inner.norm.eps] + [n.eps for layer in inner.layers
                                for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    qk = [n.eps for layer in inner.layers for n in (layer.self_attn.q_norm, layer.self_attn.k_norm) if n is not None]
    return len(set(norms)) == 1 and len(set(qk)) <= 1
