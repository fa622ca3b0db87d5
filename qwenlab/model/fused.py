"""Training-only fused operations: autograd Functions that save less and make fewer passes over memory
than the composition of the plain ops, with the same values and gradients (float32 rounding aside).

* ``linear_cross_entropy_sum``: LM head + summed token cross-entropy. The gradient of the loss w.r.t. the
  logits, softmax(z) - onehot(t), is formed during the forward pass, in place in the logits buffer,
  block by block of rows (each block stays in cache for its max / exp / sum / scale passes); backward is
  then just the two matmuls. The plain composition makes ~10 passes over the [N, V] logits (logsumexp,
  then exp again, the one-hot subtraction and the scaling in backward). On CPU the logits buffer is
  reused across steps (see ``_Workspace``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of logits processed together on CPU: about 1 MiB of float32, so that the elementwise passes of one
# block run from cache.
_CPU_BLOCK_BYTES = 1 << 20


class _Workspace:
    """The float32 logits buffer, reused from step to step on CPU. A fresh [N, V] tensor of tens of MB is
    mmap'ed by the C allocator and page-faulted in on every step: measured ~20 ms of a ~60 ms LM-head
    matmul at [1024 x 8192]. Taken by one forward, given back by its backward (a forward whose backward
    never runs keeps it taken, and later calls simply allocate)."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.busy = False

    def take(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if self.busy or device.type != "cpu" or dtype != torch.float32:
            return None
        if self.buffer is None or self.buffer.numel() < rows * cols:
            self.buffer = torch.empty(rows * cols, dtype=dtype, device=device)
        self.busy = True
        return self.buffer[:rows * cols].view(rows, cols)

    def give_back(self) -> None:
        self.busy = False


_WORKSPACE = _Workspace()


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T, targets_i) in float32 (hidden [N, H], weight [V, H], targets [N])."""
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not wants_grad or hidden.dtype != weight.dtype or torch.is_autocast_enabled(hidden.device.type):
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return _LinearCrossEntropySum.apply(hidden, weight, targets)


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        ctx.workspace = _WORKSPACE.take(hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device)
        if ctx.workspace is not None:
            logits = torch.mm(hidden, weight.t(), out=ctx.workspace)
        else:
            logits = torch.mm(hidden, weight.t())
        z = logits if logits.dtype == torch.float32 else logits.float()
        n, vocab = z.shape
        target_logit = z.gather(1, targets[:, None]).squeeze(1)
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
        grad_hidden = torch.mm(grad_logits, weight).mul_(grad) if ctx.needs_input_grad[0] else None
        grad_weight = torch.mm(grad_logits.t(), hidden).mul_(grad) if ctx.needs_input_grad[1] else None
        if ctx.workspace is not None:
            ctx.workspace = None
            _WORKSPACE.give_back()
        return grad_hidden, grad_weight, None
