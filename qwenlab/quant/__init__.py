"""Weight-only quantization: int8 per output channel, int4 in groups (docs/quantization.md).

    model = load_model(path, quantization="int8")          # or quantize_model(model, "int4", group_size=64)
    save_quantized(model, out_dir)                         # safetensors + config.json quantization_config
    model = load_model(out_dir)                            # loads quantized, no re-quantization

Every nn.Linear (attention, MLP, shared expert, LM head), the token embedding and the stacked MoE experts
are quantized; router weights (``mlp.gate``, ``shared_expert_gate``), norms and biases stay as they are.
Activations stay float32/bf16: a layer computes x @ dequant(W).T, on CPU through the AVX2 kernels of
``qwenlab.quant.kernels`` for few rows (decode) and by dequantizing blocks of rows for many (prefill). The
one exception is int4 prefill on CPU, which rounds the activations to int8 per weight group (as llama.cpp
rounds them to its Q8 blocks) to run the products on the integer unit, ~1.75x faster; docs/quantization.md.

Formats:
* int8 (symmetric, per output channel): ``qweight`` int8 [N, K] with q in [-127, 127]; ``scales`` float32
  [N] = max|W[n]| / 127.
* int4 (asymmetric, per group of G): ``qweight`` uint8 [N, K/2], two 4-bit codes q in [0, 15] per byte, in
  runs of 32 values (byte j of a run: value j low nibble, value j + 16 high nibble); ``scales`` and ``mins``
  float16 [N, K/G]; w = scale * q + min. Each group's (scale, min) is searched to minimise its squared
  error: a grid of 21 candidate scales (15 + d) / (max - min), d in -1.0..1.0, each followed by a
  least-squares refit of scale and min to the codes it gives. G divides K and is a multiple of 32; default
  64. Checkpoints written before the min existed (codes q + 8, w = scale * (code - 8)) load exactly as
  min = -8 * scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

METHODS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64
PREFILL_ROWS = 16  # above this many rows, the prefill routes (int8: dequantized blocks + sgemm; int4: int8 activations)
# Prefill dequantizes blocks of weight rows for the sgemm: about _BLOCK_ROWS rows a block (blocks of equal
# size, no small remainder), at most _BLOCK_ELEMENTS values. Measured on 512 x K x N products (K, N of
# Qwen2.5-0.5B / Qwen3-0.6B): 850-1400 rows kept the sgemm at 155-175 GFLOP/s on every shape, where blocks
# of 4M values (4,681 rows of K = 896 plus a 183-row rest) fell to 93-129 and narrow ones (< 350 rows) to 90-150.
_BLOCK_ROWS = 1024
_BLOCK_ELEMENTS = 2**24


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


SEARCH_STEPS = 10  # candidate scales (15 + d) / (max - min) for d = i / 10, i in [-10, 10]


def _int4_search_torch(groups: torch.Tensor, rows: int = 2**14):
    """The scale search of ``kernels.int4_search`` in torch (no compiled kernels): float32 [R, G] ->
    (codes uint8 [R, G], scales [R], mins [R]), scales and mins rounded to float16."""
    R, G = groups.shape
    codes = torch.empty(R, G, dtype=torch.uint8)
    scales, mins = torch.empty(R), torch.empty(R)

    def half(t):
        return t.half().float()

    def coded(x, s, m):
        q = torch.round((x - m) / torch.where(s > 0, s, 1)).clamp_(0, 15)
        return q, ((q * s + m - x) ** 2).sum(1, keepdim=True)

    for r0 in range(0, R, rows):
        x = groups[r0:r0 + rows]
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        span, sw = hi - lo, x.sum(1, keepdim=True)
        best_s, best_m = half(span / 15), half(lo)
        best_e = coded(x, best_s, best_m)[1]
        for step in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
            iscale = (15 + step / SEARCH_STEPS) / span.clamp_min(torch.finfo(torch.float32).tiny)
            q = torch.round((x - lo) * iscale).clamp_(0, 15)
            sq, sqq, sqw = q.sum(1, keepdim=True), (q * q).sum(1, keepdim=True), (q * x).sum(1, keepdim=True)
            det = G * sqq - sq * sq
            s = half((G * sqw - sq * sw) / det.clamp_min(1e-30))
            m = half((sw - s * sq) / G)
            e = coded(x, s, m)[1]
            better = (det > 0) & (s > 0) & (e < best_e)
            best_e = torch.where(better, e, best_e)
            best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
        best_s = torch.where(best_s > 0, best_s, 0)
        codes[r0:r0 + rows] = coded(x, best_s, best_m)[0].to(torch.uint8)
        scales[r0:r0 + rows], mins[r0:r0 + rows] = best_s[:, 0], best_m[:, 0]
    return codes, scales, mins


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., N, K] in [0, 15] -> [..., N, K/2] (runs of 32: value j low, j + 16 high nibble)."""
    *lead, N, K = codes.shape
    runs = codes.reshape(*lead, N, K // 32, 2, 16).to(torch.uint8)
    return (runs[..., 0, :] | (runs[..., 1, :] << 4)).reshape(*lead, N, K // 2).contiguous()


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE):
    """[..., N, K] -> (uint8 [..., N, K/2] packed codes, float16 scales [..., N, K/G], float16 mins)."""
    *lead, N, K = weight.shape
    check_group_size(K, group_size)
    groups = weight.detach().to("cpu", torch.float32).reshape(-1, group_size).contiguous()
    module = _kernels(torch.device("cpu"))
    if module is not None:
        codes, scales, mins = module.int4_search(groups)
    else:
        codes, scales, mins = _int4_search_torch(groups)
    shape = (*lead, N, K // group_size)
    device = weight.device
    return (pack_int4(codes.reshape(*lead, N, K)).to(device), scales.reshape(shape).half().to(device),
            mins.reshape(shape).half().to(device))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., N, K/2] -> uint8 codes in [0, 15], [..., N, K]."""
    *lead, N, half = packed.shape
    runs = packed.reshape(*lead, N, half // 16, 1, 16)
    codes = torch.cat([runs & 0x0F, runs >> 4], dim=-2)
    return codes.reshape(*lead, N, half * 2)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype=torch.float32):
    q = unpack_int4(packed)
    *lead, N, K = q.shape
    groups = scales.shape[-1]
    w = q.reshape(*lead, N, groups, K // groups).float() * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)
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


def quantize_tensor(weight, method: str, group_size: int) -> tuple:
    """(qweight, scales) for int8, (qweight, scales, mins) for int4."""
    return quantize_int8(weight) if method == "int8" else quantize_int4(weight, group_size)


def dequantize(method: str, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
               dtype=torch.float32) -> torch.Tensor:
    if method == "int8":
        return dequantize_int8(q, scales, dtype)
    return dequantize_int4(q, scales, mins, dtype)


# ---- the matmul ------------------------------------------------------------------------------------------
def _kernels(device: torch.device):
    if device.type != "cpu":
        return None
    from . import kernels

    return kernels.load()


def quant_linear(x: torch.Tensor, method: str, q: torch.Tensor, scales: torch.Tensor, group_size: int = 0,
                 bias: torch.Tensor | None = None, mins: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(W).T (+ bias) in x's dtype (``mins``: int4 only)."""
    route = linear_route(x)
    if route == "kernel":
        return _kernels(x.device).linear(x, [q, scales] if method == "int8" else [q, scales, mins], bias)
    if route == "device":
        return _device_linear(x, method, q, scales, bias, mins)
    module = _kernels(x.device) if method == "int4" else None
    if (module is not None and x.dtype in (torch.float32, torch.bfloat16)
            and q.is_contiguous() and scales.is_contiguous() and mins.is_contiguous()):
        # int4 prefill: products on int8 activation blocks (vpmaddubsw), ~1.75x the dequantize + sgemm route
        return module.linear_prefill_int4(x, [q, scales, mins], bias)
    return _blockwise_linear(x, method, q, scales, bias, mins)


def linear_route(x: torch.Tensor) -> str:
    """Which path ``quant_linear`` takes for x: "kernel" (CPU AVX2 kernels, up to PREFILL_ROWS rows),
    "blockwise" (CPU otherwise: int8 dequantized blocks + float32 sgemm; int4 the AVX2 prefill kernel on int8
    activation blocks when compiled) or "device" (CUDA and other devices)."""
    if x.device.type != "cpu":
        return "device"
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 0 < rows <= PREFILL_ROWS and x.dtype in (torch.float32, torch.bfloat16) and _kernels(x.device) is not None:
        return "kernel"
    return "blockwise"


def _device_linear(x, method, q, scales, bias=None, mins=None):
    """CUDA (any non-CPU device): the dequantization folded into the matmul with stock torch ops, in x's
    dtype. int8: the per-channel scale applies after the product, (x @ q.T) * scale, so only a dtype cast
    of q is materialised; int4: the codes are unpacked and scaled (w = scale * code + min) into x's dtype,
    then one GEMM. Written for CUDA but only ever run on CPU here (tests/test_quant.py): no GPU was
    available to measure it."""
    if method == "int8":
        y = F.linear(x, q.to(x.dtype)) * scales.to(x.dtype)
    else:
        y = F.linear(x, dequantize_int4(q, scales, mins, x.dtype))
    return y if bias is None else y + bias.to(x.dtype)


def _blockwise_linear(x, method, q, scales, bias, mins=None):
    """Dequantize a block of weight rows at a time and use the stock matmul (bounded memory). On CPU the
    product runs in float32: without native bf16 arithmetic (AVX2) sgemm is several times faster."""
    compute = torch.float32 if x.device.type == "cpu" else x.dtype
    xc = x.to(compute)
    bias = None if bias is None else bias.to(compute)
    N, K = q.shape[0], x.shape[-1]
    rows = max(1, min(_BLOCK_ROWS, _BLOCK_ELEMENTS // max(K, 1)))
    step = -(-N // max(1, -(-N // rows)))  # ceil(N / number of blocks): equal blocks
    module = _kernels(x.device) if q.is_contiguous() and scales.is_contiguous() else None
    parts = None if module is None else ([q, scales] if method == "int8" else [q, scales, mins.contiguous()])

    def weight(n0, n1):  # float32 rows [n0, n1) of the weight; one vectorised pass with the CPU kernels
        if parts is not None:
            return module.dequantize_rows(parts, n0, n1)
        part_mins = None if mins is None else mins[n0:n1]
        return dequantize(method, q[n0:n1], scales[n0:n1], part_mins, compute)

    if step >= N:
        return F.linear(xc, weight(0, N), bias).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], N)
    in_place = out.dtype == compute and x.device.type == "cpu"  # the sgemm writes the output columns itself
    rows_in, rows_out = xc.reshape(-1, K), out.view(-1, N)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        part_bias = None if bias is None else bias[n0:n1]
        if in_place:
            columns = rows_out[:, n0:n1]
            torch.mm(rows_in, weight(n0, n1).t(), out=columns)
            if part_bias is not None:
                columns += part_bias
        else:
            out[..., n0:n1] = F.linear(xc, weight(n0, n1), part_bias)
    return out


# ---- modules ---------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A quantized nn.Linear: buffers ``qweight``, ``scales`` (int4: and ``mins``) and the float ``bias``."""

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int, bias: bool,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = layer_method(method, in_features, group_size)
        method, group_size = self.method, self.group_size
        _register_storage(self, "", method, out_features, in_features, group_size, device)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def parts(self) -> list[torch.Tensor]:
        """[qweight, scales] (int8) or [qweight, scales, mins] (int4), as the kernels take them."""
        return [self.qweight, self.scales] if self.method == "int8" else [self.qweight, self.scales, self.mins]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.method, self.qweight, self.scales, self.group_size, self.bias,
                            None if self.method == "int8" else self.mins)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.method, self.qweight, self.scales, getattr(self, "mins", None), dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.method}, group_size={self.group_size}"


class QuantEmbedding(nn.Module):
    """A quantized nn.Embedding: rows are dequantized on lookup into ``dtype``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, method: str, group_size: int, dtype, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.method, self.group_size = layer_method(method, embedding_dim, group_size)
        method, group_size, self.dtype = self.method, self.group_size, dtype
        _register_storage(self, "", method, num_embeddings, embedding_dim, group_size, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        mins = self.mins[flat] if self.method == "int4" else None
        rows = dequantize(self.method, self.qweight[flat], self.scales[flat], mins, self.dtype)
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
            _register_storage(self, f"{name}_", self.methods[name][0], n, k, self.methods[name][1], device,
                              lead=(num_experts,))

    def project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        method, group_size = self.methods[name]
        mins = getattr(self, f"{name}_mins")[e] if method == "int4" else None
        return quant_linear(x, method, getattr(self, f"{name}_qweight")[e], getattr(self, f"{name}_scales")[e],
                            group_size, None, mins)

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
    """(qweight shape, scales shape, qweight dtype, scales dtype) of an [n, k] weight (int4 mins: like scales)."""
    if method == "int8":
        return (n, k), (n,), torch.int8, torch.float32
    if method == "int4":
        check_group_size(k, group_size)
        return (n, k // 2), (n, k // group_size), torch.uint8, torch.float16
    raise ConfigError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")


STORAGE = {"int8": ("qweight", "scales"), "int4": ("qweight", "scales", "mins")}


def _register_storage(module, prefix, method, n, k, group_size, device, lead=()):
    qshape, sshape, qdt, sdt = storage_shapes(method, n, k, group_size)
    module.register_buffer(f"{prefix}qweight", torch.empty((*lead, *qshape), dtype=qdt, device=device))
    module.register_buffer(f"{prefix}scales", torch.empty((*lead, *sshape), dtype=sdt, device=device))
    if method == "int4":
        module.register_buffer(f"{prefix}mins", torch.empty((*lead, *sshape), dtype=sdt, device=device))


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
                    parts = quantize_tensor(getattr(child, name), *new.methods[name])
                    for part, tensor in zip(STORAGE[new.methods[name][0]], parts):
                        getattr(new, f"{name}_{part}").copy_(tensor)
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
            for part in STORAGE[new.method]:
                setattr(new, part, getattr(shared, part))
        elif not structure_only:
            parts = quantize_tensor(child.weight, new.method, new.group_size)
            for part, tensor in zip(STORAGE[new.method], parts):
                getattr(new, part).copy_(tensor)
        done[id(child.weight)] = new
        setattr(parent, attr, new)
    model.quantization = {"quant_method": "qwenlab", "method": method, "group_size": group_size or None}
    if method == "int4":
        model.quantization["int4_mins"] = True  # the asymmetric format (older files: symmetric, no mins)
    if tied and not structure_only:
        _retie(model)
    return model


def _retie(model: nn.Module) -> None:
    """Point a tied quantized LM head at the embedding's buffers (after to_empty / loading)."""
    if (model.config.tie_word_embeddings and isinstance(model.lm_head, QuantLinear)
            and isinstance(model.model.embed_tokens, QuantEmbedding)):
        for part in STORAGE[model.lm_head.method]:
            setattr(model.lm_head, part, getattr(model.model.embed_tokens, part))


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
