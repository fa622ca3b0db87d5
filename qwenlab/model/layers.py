"""Building blocks shared by every Qwen family: RMSNorm, rotary embedding, attention, SwiGLU MLP.

Numerics follow transformers exactly (see docs qwen-architecture.md §2 and §4): RMSNorm statistics in
fp32 and the cast back *before* the weight multiply; cos/sin built in fp32, scaled by the attention
factor, then cast to the activation dtype; attention scale ``head_dim ** -0.5``.

Attention itself is delegated to an *attention context* chosen by the caller, so the same layers serve
a plain causal forward, packed variable-length training rows and the engine's paged KV cache.
"""

from __future__ import annotations

import contextlib

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.wants_fused(x, self.weight):
            return fused.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ---- rotary embedding ----------------------------------------------------------------------------
def rope_inv_freq(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the attention factor for the config's RoPE variant.

    ``seq_len`` (max position + 1 of the current forward) only matters for dynamic NTK scaling.
    """
    dim, base = config.head_dim, float(config.rope_theta)
    scaling = config.rope_scaling or {}
    kind = config.rope_type
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if kind == "default":
        return 1.0 / base**exponents, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return 1.0 / base**exponents / factor, 1.0
    if kind == "dynamic":
        max_pos = config.max_position_embeddings
        length = max(seq_len or max_pos, max_pos)
        base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base**exponents, 1.0
    return _yarn_inv_freq(config, scaling, factor, dim, base, exponents)


def _yarn_inv_freq(config, scaling, factor, dim, base, exponents) -> tuple[torch.Tensor, float]:
    # YaRN as transformers >= 4.56 and vLLM: the given factor, ramp on original_max_position_embeddings.
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    freqs = base**exponents
    inv_freq = (1.0 / (factor * freqs)) * ramp + (1.0 / freqs) * (1 - ramp)
    return inv_freq, float(attention_factor)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device, enabled: bool = True):
    """Run the torch ops inside on the calling thread alone (CPU; restored after). For the small ops of a
    decode step between the engine's own kernels: ATen and MKL fork an OpenMP team for them (MKL's vector
    math for any size once ``torch.set_num_threads`` has been called, ATen for a vocabulary-wide row), and
    the idle OpenMP worker then spins for milliseconds on the core the engine's decode threads need
    (int8 decode on 2 cores: 35 -> 46 tokens/s). The work itself needs no second thread."""
    threads = torch.get_num_threads() if enabled and device.type == "cpu" else 1
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. Rebuilt lazily, so meta-device construction is free."""

    SERIAL_POSITIONS = 4096  # up to this many positions (a decode step, a prefill chunk) on one CPU thread

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self._cache: tuple[torch.Tensor, float] | None = None

    def _inv_freq(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.config.rope_type == "dynamic":
            seq_len = int(positions.max()) + 1 if positions.numel() else 1
            if seq_len > self.config.max_position_embeddings:
                inv, factor = rope_inv_freq(self.config, seq_len)
                return inv.to(positions.device), factor
        if self._cache is None or self._cache[0].device != positions.device:
            inv, factor = rope_inv_freq(self.config)
            self._cache = (inv.to(positions.device), factor)
        return self._cache

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, factor = self._inv_freq(positions)
        with one_cpu_thread(positions.device, positions.numel() <= self.SERIAL_POSITIONS), \
                torch.autocast(device_type=positions.device.type, enabled=False):
            freqs = positions.float()[..., None] * inv_freq  # [..., hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * factor, emb.sin() * factor
            return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, hd]; cos/sin: [B, S, hd] or [S, hd] (broadcast over heads)."""
    if fused.wants_fused(x):
        return fused.apply_rope(x, cos, sin)
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    return x * cos + rotate_half(x) * sin


# ---- attention contexts ----------------------------------------------------------------------------
class CausalAttention:
    """Plain causal attention over each row of a [B, S] batch (positions 0..S-1 per row)."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # q: [B, nh, S, hd], k/v: [B, nkv, S, hd] -> [B, nh, S, hd]
        return sdpa(q, k, v, scale=scale, is_causal=q.shape[2] > 1)


class PackedAttention:
    """Several documents packed into one row: causal inside each, nothing across (training, prefill).

    ``cu_seqlens``: int tensor [n_docs + 1] of document boundaries in the flattened token axis.
    """

    def __init__(self, cu_seqlens: torch.Tensor, total: int | None = None):
        self.cu_seqlens = cu_seqlens
        bounds = cu_seqlens.tolist()
        total = total or bounds[-1]
        doc = torch.zeros(total, dtype=torch.long, device=cu_seqlens.device)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            doc[a:b] = i
        idx = torch.arange(total, device=cu_seqlens.device)
        self.mask = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])

    def attend(self, layer_idx, q, k, v, scale):
        return sdpa(q, k, v, scale=scale, attn_mask=self.mask)


def sdpa(q, k, v, scale: float, is_causal: bool = False, attn_mask=None) -> torch.Tensor:
    """scaled_dot_product_attention with grouped KV heads handled by the kernel (no repeated K/V)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        H, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.has_qkv_bias
        self.q_proj = nn.Linear(H, q_dim, bias=bias)
        self.k_proj = nn.Linear(H, kv_dim, bias=bias)
        self.v_proj = nn.Linear(H, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, H, bias=config.has_o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context) -> torch.Tensor:
        B, S, _ = x.shape
        # head counts from the projections' widths: under tensor parallel each rank holds heads / T of them
        q = self.q_proj(x).view(B, S, -1, self.head_dim)
        k = self.k_proj(x).view(B, S, -1, self.head_dim)
        v = self.v_proj(x).view(B, S, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE after the transpose, as transformers does: the attention kernel then sees the same memory
        # layout, which keeps bfloat16 results bit-identical to the reference.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = context.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
