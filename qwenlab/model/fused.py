"""Training-only fused operations: autograd Functions that save less and make fewer passes over memory
than the composition of the plain ops, with the same values and gradients (float32 rounding aside).

* ``linear_cross_entropy_sum``: LM head + summed token cross-entropy. The gradient of the loss w.r.t. the
  logits, softmax(z) - onehot(t), is formed during the forward pass, in place in the logits buffer,
  block by block of rows (each block stays in cache for its max / exp / sum / scale passes); backward is
  then just the two matmuls. The plain composition makes ~10 passes over the [N, V] logits (logsumexp,
  then exp again, the one-hot subtraction and the scaling in backward). On CPU the logits buffer comes
  from ``POOL`` (buffers reused across steps, see ``BufferPool``).
* ``rms_norm`` and ``apply_rope``: the same math as ``layers.RMSNorm`` / ``layers.apply_rope`` with a
  hand-written backward; about half the time of autograd through the composition (fewer temporaries
  and passes). Used only when a gradient is needed, on plain (non-DTensor) tensors: inference keeps the
  reference code path and its bit-exact numerics.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

# Rows of logits processed together on CPU: about 1 MiB of float32, so that the elementwise passes of one
# block run from cache.
_CPU_BLOCK_BYTES = 1 << 20
# The CPU logits product [N, H] x [H, V] in column blocks of this many vocabulary rows: MKL runs the whole
# product at 73-79 GFLOP/s at N 1,020, H 256, V 8,192 (single thread) and 1,024-column blocks of it at 84-85
# (512: 77-85, 2,048: 76-78); a training step of the MoE benchmark model 7 ms faster.
_CPU_VOCAB_BLOCK = 1024


class BufferPool:
    """Large CPU tensors of the training passes, reused from step to step instead of allocated afresh.

    A fresh allocation of a few MB is mmap'ed by the C allocator (or comes from heap it trimmed) and is
    page-faulted in on first touch: measured ~2.2 us per 4 KiB page here, ~7,000 pages and ~15 ms of a
    ~420 ms step of the MoE benchmark model. ``empty(key, shape)`` hands out a view of a kept buffer of that
    key whose storage nothing else references (the storage's reference count, as torch's own CUDA-graph
    pools check liveness), so a tensor still saved for backward, returned to autograd or kept by the caller
    is never written over; otherwise it allocates and keeps the new buffer in place of the free (too small)
    ones, up to ``per_key`` buffers a key (one per layer for activations saved for backward): what is kept
    is at most what was in use at once, as the requests grow. Contents are undefined, as with
    ``torch.empty``. Other devices, and torch builds without the reference count, allocate plainly.
    ``clear()`` drops the kept buffers (``qwenlab.train.train`` does at its end; callers of
    ``training_step`` keep them until they call it)."""

    def __init__(self, per_key: int = 64):
        self.per_key = per_key
        self.buffers: dict[tuple, list[tuple[torch.Tensor, int]]] = {}  # (buffer, its storage's count when idle)
        self.lock = threading.Lock()  # one thread's check-and-take at a time

    def empty(self, key: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        shape = tuple(shape)
        if torch.device(device).type != "cpu" or _storage_use_count is None:
            return torch.empty(shape, dtype=dtype, device=device)
        with self.lock:
            return self._take(key, shape, dtype)

    def _take(self, key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        kept = self.buffers.setdefault((key, dtype), [])
        for buffer, idle in kept:
            if buffer.numel() >= size and _uses(buffer) <= idle:
                return buffer[:size].view(shape)
        buffer = torch.empty(size, dtype=dtype)
        kept[:] = [(b, idle) for b, idle in kept if _uses(b) > idle]  # the free ones are too small: dropped
        if len(kept) < self.per_key:
            kept.append((buffer, _uses(buffer)))
        return buffer[:size].view(shape)

    def clear(self) -> None:
        with self.lock:
            self.buffers.clear()


def _uses(buffer: torch.Tensor) -> int:
    """References to the buffer's storage (counting the temporary storage object of this call)."""
    return _storage_use_count(buffer.untyped_storage()._cdata)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
POOL = BufferPool()


def wants_fused(*tensors: torch.Tensor) -> bool:
    """Training on plain tensors: a gradient is needed and none of them is a DTensor (tensor parallel)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T, targets_i) in float32 (hidden [N, H], weight [V, H], targets [N])."""
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not wants_grad or hidden.dtype != weight.dtype or torch.is_autocast_enabled(hidden.device.type):
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return _LinearCrossEntropySum.apply(hidden, weight, targets)


_CPU_KERNELS: list = []


def cpu_kernels():
    """The compiled CPU kernels (``qwenlab.engine.kernels``) where they load and have the BLAS sgemm their
    training attention needs, else None: the training passes below then use stock ops."""
    if not _CPU_KERNELS:
        from ..engine import kernels

        module = kernels.load()
        _CPU_KERNELS.append(module if module is not None and module.has_sgemm() else None)
    return _CPU_KERNELS[0]


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        if hidden.device.type == "cpu":
            logits = POOL.empty("logits", (hidden.shape[0], weight.shape[0]), hidden.dtype, hidden.device)
            for first in range(0, weight.shape[0], _CPU_VOCAB_BLOCK):  # see _CPU_VOCAB_BLOCK
                rows = weight[first:first + _CPU_VOCAB_BLOCK]
                torch.mm(hidden, rows.t(), out=logits[:, first:first + rows.shape[0]])
        else:
            logits = torch.mm(hidden, weight.t())
        z = logits if logits.dtype == torch.float32 else logits.float()
        n, vocab = z.shape
        target_logit = z.gather(1, targets[:, None]).squeeze(1)
        ops = cpu_kernels() if z.device.type == "cpu" and z.is_contiguous() else None
        if ops is not None:  # one vectorised pass per row: softmax - onehot in place, the row's log-sum-exp
            lse = ops.softmax_xent_rows(z, targets)
        else:
            lse = torch.empty(n, dtype=torch.float32, device=z.device)
            block = max(1, _CPU_BLOCK_BYTES // (4 * vocab)) if z.device.type == "cpu" else max(n, 1)
            for first in range(0, n, block):
                rows = z[first:first + block]
                top = rows.amax(1, keepdim=True)
                rows.sub_(top).exp_()
                total = rows.sum(1, keepdim=True)
                rows.div_(total)  # softmax
                lse[first:first + block] = total.log_().add_(top).squeeze(1)
            z[torch.arange(n, device=z.device), targets] -= 1  # softmax - onehot: d(loss)/d(logits)
        grad_logits = z if z.dtype == weight.dtype else z.to(weight.dtype)
        ctx.save_for_backward(hidden, weight, grad_logits)
        return (lse - target_logit).sum()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, grad_logits = ctx.saved_tensors
        grad = grad.to(grad_logits.dtype)
        if grad_logits.device.type == "cpu":  # the scalar goes into the GEMM's alpha: no pass over [V, H]
            alpha, zero = float(grad), grad_logits.new_zeros(())

            def scaled_mm(a, b, role):  # into a reused buffer (BufferPool)
                out = POOL.empty(role, (a.shape[0], b.shape[1]), a.dtype, a.device)
                return torch.addmm(zero, a, b, beta=0, alpha=alpha, out=out)
        else:
            def scaled_mm(a, b, role):
                return torch.mm(a, b).mul_(grad)
        grad_hidden = scaled_mm(grad_logits, weight, "lm_head.grad_hidden") if ctx.needs_input_grad[0] else None
        grad_weight = scaled_mm(grad_logits.t(), hidden, "lm_head.grad_weight") if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None


# ---- token embedding ---------------------------------------------------------------------------------------
def embedding(ids: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """``module(ids)``; in CPU training on plain tensors its weight gradient is formed in a reused buffer
    (``POOL``) instead of a fresh zeroed [V, H] tensor every step (8 MB and ~2,000 page faults a step at
    V 8,192, H 256 when the C allocator has returned that memory)."""
    if type(module) is not torch.nn.Embedding:  # e.g. a quantized table
        return module(ids)
    weight = module.weight
    if (weight.device.type != "cpu" or not wants_fused(weight) or module.padding_idx is not None
            or module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
        return module(ids)
    return _Embedding.apply(ids, weight)


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight_shape = weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        grad_weight = POOL.empty("embedding.grad", ctx.weight_shape, grad.dtype, grad.device).zero_()
        return None, grad_weight.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))


# ---- RMSNorm ----------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) with the statistics in float32 and the cast back before the weight multiply
    (transformers' order). Saves x and the per-row 1/rms only; the backward recomputes x / rms."""
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ops = cpu_kernels() if x.device.type == "cpu" and x.dtype == torch.float32 == weight.dtype else None
        ctx.ops = ops
        if ops is not None:  # one pass a row; rstd [N] saved
            rows = x.contiguous()
            out, rstd = ops.rms_norm_train_forward(rows, weight.contiguous(), eps)
            ctx.save_for_backward(rows, weight, rstd)
            return out
        x32 = x.float()
        rstd = torch.linalg.vecdot(x32, x32, dim=-1).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = x32 * rstd
        out = normed.mul_(weight) if x.dtype == torch.float32 == weight.dtype else weight * normed.to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        if ctx.ops is not None:
            grad_x, grad_weight = ctx.ops.rms_norm_train_backward(grad, x, weight.contiguous(), rstd)
            return grad_x, grad_weight if ctx.needs_input_grad[1] else None, None
        xhat = x.float() * rstd
        grad32 = grad.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad32 * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gxhat = grad32 * weight.float()
            dot = torch.linalg.vecdot(gxhat, xhat, dim=-1).unsqueeze(-1).div_(x.shape[-1])
            grad_x = gxhat.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


# ---- rotary embedding ----------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin without building rotate_half(x): two multiply-adds on the halves, and
    the same (transposed rotation) in backward. x [B, heads, S, hd]; cos/sin broadcast over heads."""
    return _Rope.apply(x, cos, sin)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ops = cpu_kernels() if x.device.type == "cpu" and x.dtype == cos.dtype == sin.dtype == torch.float32 else None
        if (ops is not None and x.dim() == 4 and cos.dim() == 3 and x.stride(-1) == 1
                and cos.stride(-1) == sin.stride(-1) == 1):
            ctx.ops = ops  # both halves in one pass a row, in x's layout
            ctx.save_for_backward(cos, sin)
            return ops.rope_train(x, cos, sin, False)
        ctx.ops = None
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if ctx.ops is not None and grad.stride(-1) == 1:
            return ctx.ops.rope_train(grad, cos, sin, True), None, None
        if ctx.ops is not None:
            cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
        half = grad.shape[-1] // 2
        grad_x = grad * cos
        grad_x[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        grad_x[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return grad_x, None, None


# ---- attention (CPU training) ----------------------------------------------------------------------------------
# Query rows per block: each block of queries only meets the keys up to its last position (the causal upper
# triangle of blocks is never computed). Measured on this project's 2-core CPU at S=256, d=64, float32, single
# thread (forward + backward of one layer, process CPU time): 64-row blocks 13.2 ms, 32-row 12.6 ms, the flash
# kernel 15.1 ms.
ATTENTION_BLOCK = 64
# Unlike the flash kernel (O(S) saved per row), the backward keeps the probabilities (about B * h * S^2 / 2
# floats per layer): used only while they stay small. Long-context rows take the flash kernel.
ATTENTION_MAX_SAVED_BYTES = 64 << 20


def wants_blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Training on CPU in float32 (no autocast), plain tensors, grouped heads dividing evenly, and saved
    probabilities within ``ATTENTION_MAX_SAVED_BYTES``."""
    B, h, S = q.shape[:3]
    saved = 4 * B * h * S * (S + ATTENTION_BLOCK) // 2
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32 and wants_fused(q, k, v)
            and not torch.is_autocast_enabled("cpu") and q.shape[1] % k.shape[1] == 0 and q.shape[2] == k.shape[2]
            and saved <= ATTENTION_MAX_SAVED_BYTES)


def wants_kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """``wants_blocked_attention`` without the memory bound (the kernel saves O(S) per row, not S^2)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32 and wants_fused(q, k, v)
            and not torch.is_autocast_enabled("cpu") and q.shape[1] % k.shape[1] == 0 and q.shape[2] == k.shape[2])


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention (further restricted by ``mask`` [B, 1, S, S], True = attend, if given) for training
    on CPU: batched matmuls over blocks of query rows, the query heads that share a KV head stacked into
    one matmul (no repeated K/V), softmax in place, a hand-written backward from the saved probabilities.
    q [B, h, S, d], k/v [B, kv, S, d] -> [B, h, S, d]. The same math as ``sdpa(..., is_causal=True)``."""
    return _BlockedAttention.apply(q, k, v, scale, mask)


def _attention_blocks(S: int) -> list[tuple[int, int]]:
    starts = list(range(0, S, ATTENTION_BLOCK))
    return [(a, min(a + ATTENTION_BLOCK, S)) for a in starts]


class _KernelAttention(torch.autograd.Function):
    """The compiled CPU kernels' training attention (``qwenlab.engine.kernels``: flash-attention order on the
    sgemm, documents as a first visible key per token): saves the output and the log-sum-exp, plus the
    probabilities for rows of up to 256 tokens; for longer rows the backward recomputes them block by block."""

    @staticmethod
    def forward(ctx, q, k, v, scale, first_key, ops):
        out, lse, probs = ops.attention_forward(q, k, v, scale, first_key, True)
        ctx.save_for_backward(q, k, v, out, lse, first_key, probs)
        ctx.scale, ctx.ops = scale, ops
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, first_key, probs = ctx.saved_tensors
        dq, dk, dv = ctx.ops.attention_backward(q, k, v, out, lse, grad_out, ctx.scale, first_key, probs)
        return dq, dk, dv, None, None, None


def document_first_key(doc_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, S] document ids of packed rows -> [B, S] int32 position of each token's document start (where
    each document is one contiguous span; None otherwise, when the mask is not a per-token key range)."""
    B, S = doc_ids.shape
    pos = torch.arange(S, device=doc_ids.device).expand(B, S)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    spans = starts.sum(1)
    ordered = doc_ids.sort(dim=1).values  # distinct ids a row, without a per-row loop
    distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(1)
    return first.to(torch.int32) if bool((spans == distinct).all()) else None


def kernel_attention(q, k, v, scale: float, first_key: torch.Tensor | None, ops) -> torch.Tensor:
    """Causal attention restricted to [first_key, i] per query (documents), with the compiled kernels."""
    empty = q.new_empty(0, dtype=torch.int32)
    return _KernelAttention.apply(q, k, v, scale, empty if first_key is None else first_key, ops)


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, mask):
        B, h, S, d = q.shape
        kv = k.shape[1]
        g, BK = h // kv, B * kv
        Q = q.reshape(BK, g, S, d)
        K, V = k.reshape(BK, S, d), v.reshape(BK, S, d)
        out = q.new_empty(BK, g, S, d)
        probs = []
        for a, b in _attention_blocks(S):
            rows = b - a
            Qb = Q[:, :, a:b].reshape(BK, g * rows, d)
            s = torch.baddbmm(Qb.new_empty(()), Qb, K[:, :b].transpose(1, 2), beta=0, alpha=scale)
            keep = torch.ones(rows, b, dtype=torch.bool, device=q.device).tril_(a)
            if mask is not None:
                keep = keep & mask[:, :, a:b, :b]  # [B, 1, rows, b]
                s.view(B, kv, g, rows, b).masked_fill_(~keep[:, :, None], float("-inf"))
            else:
                s.view(BK, g, rows, b).masked_fill_(~keep, float("-inf"))
            p = torch.softmax(s, -1)
            probs.append(p)
            out[:, :, a:b] = torch.bmm(p, V[:, :b]).view(BK, g, rows, d)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.scale = scale
        return out.view(B, h, S, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *probs = ctx.saved_tensors
        B, h, S, d = q.shape
        kv = k.shape[1]
        g, BK = h // kv, B * kv
        Q = q.reshape(BK, g, S, d)
        K, V = k.reshape(BK, S, d), v.reshape(BK, S, d)
        dO = grad_out.reshape(BK, g, S, d)
        dQ = torch.empty_like(Q)
        dK = dV = None
        # last block first: it meets every key, so its products are dK / dV themselves (contiguous outputs);
        # the earlier blocks add into a prefix of the keys
        for (a, b), p in reversed(list(zip(_attention_blocks(S), probs))):
            rows = b - a
            dOb = dO[:, :, a:b].reshape(BK, g * rows, d)
            dp = torch.bmm(dOb, V[:, :b].transpose(1, 2))
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dQ[:, :, a:b] = torch.baddbmm(ds.new_empty(()), ds, K[:, :b], beta=0, alpha=ctx.scale).view(BK, g, rows, d)
            pv = torch.bmm(p.transpose(1, 2), dOb)
            sq = torch.baddbmm(ds.new_empty(()), ds.transpose(1, 2), Q[:, :, a:b].reshape(BK, g * rows, d), beta=0,
                               alpha=ctx.scale)
            if dV is None:
                dV, dK = pv, sq
            else:
                dV[:, :b] += pv
                dK[:, :b] += sq
        return dQ.view(B, h, S, d), dK.view(B, kv, S, d), dV.view(B, kv, S, d), None, None
