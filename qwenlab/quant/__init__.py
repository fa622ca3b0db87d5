"""Weight-only quantization: int8 per output channel, int4 in groups (docs/quantization.md).

    model = load_model(path, quantization="int8")          # or quantize_model(model, "int4", group_size=64)
    save_quantized(model, out_dir)                         # safetensors + config.json quantization_config
    model = load_model(out_dir)                            # loads quantized, no re-quantization

Every nn.Linear (attention, MLP, shared expert, LM head), the token embedding and the stacked MoE experts
are quantized; router weights (``mlp.gate``, ``shared_expert_gate``), norms and biases stay as they are.
Activations stay float32/bf16: a layer computes x @ dequant(W).T, on CPU through the AVX2 kernels of
``qwenlab.quant.kernels`` for few rows (decode) and by dequantizing blocks of rows for many (prefill).

Formats (symmetric, no zero point):
* int8: ``qweight`` int8 [N, K] with q in [-127, 127]; ``scales`` float32 [N] = max|W[n]| / 127.
* int4: ``qweight`` uint8 [N, K/2], two 4-bit codes q + 8 (q in [-8, 7]) per byte, in runs of 32 values
  (byte j of a run: value j low nibble, value j + 16 high nibble); ``scales`` float16 [N, K/G] =
  max|group| / 7. G (group size) divides K and is a multiple of 32; default 64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

METHODS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64
PREFILL_ROWS = 16  # above this many rows, dequantize blocks of weight rows and use the stock matmul
_BLOCK_ELEMENTS = 2**22  # weight elements dequantized at a time on the prefill path


# ---- quantize / dequantize tensors ----------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] -> (int8 [..., N, K], float32 scales [..., N]) per output channel (row)."""
    w = weight.detach().float()
    scales = (w.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scales.unsqueeze(-1)).to(dtype)


def check_group_size(in_features: int, group_size: int, name: str = "") -> None:
    if group_size < 32 or group_size % 32:
        raise ConfigError(f"int4 group size {group_size} must be a multiple of 32 (32, 64, 128, ...)")
    if in_features % group_size:
        raise ConfigError(f"int4 group size {group_size} does not divide the input size {in_features}"
                          + (f" of {name}" if name else ""))


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] -> (uint8 [..., N, K/2] packed codes, float16 scales [..., N, K/G])."""
    *lead, N, K = weight.shape
    check_group_size(K, group_size)
    w = weight.detach().float().reshape(*lead, N, K // group_size, group_size)
    scales = (w.abs().amax(-1) / 7).clamp_min(2**-24).to(torch.float16)
    q = torch.round(w / scales.float().unsqueeze(-1)).clamp_(-8, 7).to(torch.int16) + 8
    runs = q.reshape(*lead, N, K // 32, 2, 16).to(torch.uint8)
    packed = runs[..., 0, :] | (runs[..., 1, :] << 4)
    return packed.reshape(*lead, N, K // 2).contiguous(), scales


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., N, K/2] -> int8 codes q in [-8, 7], [..., N, K]."""
    *lead, N, half = packed.shape
    runs = packed.reshape(*lead, N, half // 16, 1, 16)
    codes = torch.cat([runs & 0x0F, runs >> 4], dim=-2)
    return (codes.to(torch.int8) - 8).reshape(*lead, N, half * 2)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    q = unpack_int4(packed)
    *lead, N, K = q.shape
    groups = scales.shape[-1]
    w = q.reshape(*lead, N, groups, K // groups).float() * scales.float().unsqueeze(-1)
    return w.reshape(*lead, N, K).to(dtype)


def layer_method(method: str, in_features: int, group_size: int) -> tuple[str, int]:
    """The (method, group size) a weight with ``in_features`` inputs gets: int4 uses the largest multiple of
    32 up to ``group_size`` that divides ``in_features``; where none does, that weight is stored int8."""
    if method != "int4":
        return method, 0
    for size in range(group_size, 31, -32):
        if in_features % size == 0:
            return "int4", size
    return "int8", 0


def quantize_tensor(weight, method: str, group_size: int):
    return quantize_int8(weight) if method == "int8" else quantize_int4(weight, group_size)


def dequantize(method: str, q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return dequantize_int8(q, scales, dtype) if method == "int8" else dequantize_int4(q, scales, dtype)


# ---- the matmul ------------------------------------------------------------------------------------------
def _kernels(device: torch.device):
    if device.type != "cpu":
        return None
    from . import kernels

    return kernels.load()


def quant_linear(x: torch.Tensor, method: str, q: torch.Tensor, scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(W).T (+ bias) in x's dtype."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    module = _kernels(x.device) if x.dtype in (torch.float32, torch.bfloat16) else None
    if module is not None and 0 < rows <= PREFILL_ROWS:
        if method == "int8":
            return module.int8_linear(x, q, scales, bias)
        return module.int4_linear(x, q, scales, group_size, bias)
    return _blockwise_linear(x, method, q, scales, bias)


def _blockwise_linear(x, method, q, scales, bias):
    """Dequantize a block of weight rows at a time and use the stock matmul (bounded memory). On CPU the
    product runs in float32: without native bf16 arithmetic (AVX2) sgemm is several times faster."""
    compute = torch.float32 if x.device.type == "cpu" else x.dtype
    xc = x.to(compute)
    bias = None if bias is None else bias.to(compute)
    N, K = q.shape[0], x.shape[-1]
    step = max(1, _BLOCK_ELEMENTS // max(K, 1))
    if step >= N:
        return F.linear(xc, dequantize(method, q, scales, compute), bias).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], N)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        out[..., n0:n1] = F.linear(xc, dequantize(method, q[n0:n1], scales[n0:n1], compute),
                                   None if bias is None else bias[n0:n1])
    return out


# ---- modules ---------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A quantized nn.Linear: buffers ``qweight`` and ``scales`` (and the float ``bias`` parameter)."""

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int, bias: bool,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = layer_method(method, in_features, group_size)
        method, group_size = self.method, self.group_size
        qshape, sshape, qdt, sdt = storage_shapes(method, out_features, in_features, group_size)
        self.register_buffer("qweight", torch.empty(qshape, dtype=qdt, device=device))
        self.register_buffer("scales", torch.empty(sshape, dtype=sdt, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.method, self.qweight, self.scales, self.group_size, self.bias)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.method, self.qweight, self.scales, dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.method}, group_size={self.group_size}"


class QuantEmbedding(nn.Module):
    """A quantized nn.Embedding: rows are dequantized on lookup into ``dtype``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, method: str, group_size: int, dtype, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.method, self.group_size = layer_method(method, embedding_dim, group_size)
        method, group_size, self.dtype = self.method, self.group_size, dtype
        qshape, sshape, qdt, sdt = storage_shapes(method, num_embeddings, embedding_dim, group_size)
        self.register_buffer("qweight", torch.empty(qshape, dtype=qdt, device=device))
        self.register_buffer("scales", torch.empty(sshape, dtype=sdt, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.method, self.qweight[flat], self.scales[flat], self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)


class QuantExperts(nn.Module):
    """Stacked SwiGLU experts with quantized gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, method: str, group_size: int,
                 device=None):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.methods = {}  # projection -> (method, group size)
        for name, (n, k) in (("gate_up_proj", (2 * intermediate_size, hidden_size)),
                             ("down_proj", (hidden_size, intermediate_size))):
            self.methods[name] = layer_method(method, k, group_size)
            qshape, sshape, qdt, sdt = storage_shapes(self.methods[name][0], n, k, self.methods[name][1])
            self.register_buffer(f"{name}_qweight", torch.empty((num_experts, *qshape), dtype=qdt, device=device))
            self.register_buffer(f"{name}_scales", torch.empty((num_experts, *sshape), dtype=sdt, device=device))

    def project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        method, group_size = self.methods[name]
        return quant_linear(x, method, getattr(self, f"{name}_qweight")[e], getattr(self, f"{name}_scales")[e],
                            group_size)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        order = flat.argsort(stable=True)
        token_of_slot = order // k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x[token_of_slot]
        ys = torch.empty_like(xs)
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            rows = slice(start, start + count)
            gate, up = self.project("gate_up_proj", e, xs[rows]).chunk(2, dim=-1)
            ys[rows] = self.project("down_proj", e, F.silu(gate) * up)
            start += count
        ys = ys * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of_slot, ys)


def storage_shapes(method: str, n: int, k: int, group_size: int):
    """(qweight shape, scales shape, qweight dtype, scales dtype) of an [n, k] weight."""
    if method == "int8":
        return (n, k), (n,), torch.int8, torch.float32
    if method == "int4":
        check_group_size(k, group_size)
        return (n, k // 2), (n, k // group_size), torch.uint8, torch.float16
    raise ConfigError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")


# ---- whole models ------------------------------------------------------------------------------------------
def check_method(method: str, group_size: int | None) -> int:
    if method not in METHODS:
        raise ConfigError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    group_size = group_size or DEFAULT_GROUP_SIZE
    if method == "int4" and (group_size < 32 or group_size % 32):
        raise ConfigError(f"int4 group size {group_size} must be a multiple of 32 (32, 64, 128, ...)")
    return group_size if method == "int4" else 0


def _quantizable(model: nn.Module):
    """(parent, attribute, module) of every module to quantize; routers and gates are skipped."""
    from ..model.moe import Experts, SparseMoE

    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(parent, SparseMoE) and attr in ("gate", "shared_expert_gate"):
                continue
            if type(child) in (nn.Linear, nn.Embedding) or isinstance(child, Experts):
                yield parent, attr, child


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int | None = None, *, structure_only: bool = False):
    """Replace the model's Linear / Embedding / Experts modules with quantized ones, in place.

    ``structure_only`` builds empty quantized modules (to load a quantized checkpoint into).
    """
    from ..model.moe import Experts

    group_size = check_method(method, group_size)
    config = model.config
    dtype = model.model.norm.weight.dtype
    tied = config.tie_word_embeddings
    done: dict[int, nn.Module] = {}
    for parent, attr, child in list(_quantizable(model)):
        device = None if structure_only else _device_of(child)
        if isinstance(child, Experts):
            E, two_i, H = child.gate_up_proj.shape
            new = QuantExperts(E, H, two_i // 2, method, group_size, device=device)
            if not structure_only:
                for name in ("gate_up_proj", "down_proj"):
                    q, s = quantize_tensor(getattr(child, name), *new.methods[name])
                    getattr(new, f"{name}_qweight").copy_(q)
                    getattr(new, f"{name}_scales").copy_(s)
            setattr(parent, attr, new)
            continue
        if isinstance(child, nn.Embedding):
            new = QuantEmbedding(child.num_embeddings, child.embedding_dim, method, group_size, dtype, device=device)
        else:
            new = QuantLinear(child.in_features, child.out_features, method, group_size, child.bias is not None,
                              dtype=dtype, device=device)
            if child.bias is not None and not structure_only:
                new.bias.copy_(child.bias)
        shared = done.get(id(child.weight))
        if shared is not None:  # tied LM head and embedding: one set of buffers
            new.qweight, new.scales = shared.qweight, shared.scales
        elif not structure_only:
            q, s = quantize_tensor(child.weight, new.method, new.group_size)
            new.qweight.copy_(q)
            new.scales.copy_(s)
        done[id(child.weight)] = new
        setattr(parent, attr, new)
    model.quantization = {"quant_method": "qwenlab", "method": method, "group_size": group_size or None}
    if tied and not structure_only:
        _retie(model)
    return model


def _retie(model: nn.Module) -> None:
    """Point a tied quantized LM head at the embedding's buffers (after to_empty / loading)."""
    if (model.config.tie_word_embeddings and isinstance(model.lm_head, QuantLinear)
            and isinstance(model.model.embed_tokens, QuantEmbedding)):
        model.lm_head.qweight = model.model.embed_tokens.qweight
        model.lm_head.scales = model.model.embed_tokens.scales


def _device_of(module: nn.Module):
    tensor = next(iter(module.parameters()), None)
    return None if tensor is None else tensor.device


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization", None) is not None


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of weights (parameters and buffers, tied ones once) held by the model."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


from .checkpoint import load_quantized, save_quantized  # noqa: E402

__all__ = ["METHODS", "DEFAULT_GROUP_SIZE", "quantize_model", "save_quantized", "load_quantized", "QuantLinear",
           "QuantEmbedding", "QuantExperts", "quantize_int8", "quantize_int4", "dequantize", "is_quantized"]
