"""The engine's fused decoder pieces for quantized models (CPU): attention inputs and SwiGLU MLP.

A bf16 model in the engine runs each layer's q/k/v projections + q/k RMSNorm + RoPE as one kernel call
(``qwenlab.engine.kernels``) and its MLP as another. ``use_quant_kernels(model)`` gives a quantized model
the same structure with ``qwenlab.quant.kernels``: int8 or int4 weights are read once per token, the
projections of a call share one parallel region, and the small element-wise work (norms, RoPE, SwiGLU)
runs in C++ instead of separate stock ops. Layers whose projections are not all quantized, prefill-sized
inputs (more than ``PREFILL_ROWS`` tokens, where the dequantizing matmul wins), autograd and other devices
fall back to the stock forward.
"""

from __future__ import annotations

import torch

from ..model.layers import MLP, Attention
from . import PREFILL_ROWS, QuantLinear
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
        if not _fast(x):
            return super().forward(x)
        return quant_kernels._module.mlp(x, self.gate_proj.parts(), self.up_proj.parts(), self.down_proj.parts())


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
    return count
