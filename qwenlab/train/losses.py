"""Training losses: token cross-entropy normalised over the global batch, MoE balancing and router z-loss.

Every term is a *sum over the tokens of one micro-batch divided by the count over the whole global batch*
(all micro-batches, all data-parallel ranks). Counts are known before the step starts (every rank
builds the same global batch), so accumulating gradients over micro-batches and ranks gives exactly the
gradient of the global-batch mean, whatever the split.

MoE load balancing (qwen-architecture.md §3.3): ``aux = E * sum_e f_e * P_e`` with ``f_e`` the fraction of
top-k slots routed to expert e and ``P_e`` the mean router probability, pooled over all MoE layers.

* ``global`` (Qwen, arXiv 2501.11873): ``f`` is counted over the global batch: each micro-batch's counts
  are all-reduced over the data-parallel ranks and accumulated over the step's micro-batches (as
  Megatron's ``global_aux_loss``); ``P`` keeps its gradient locally. With one micro-batch per rank
  the gradient is exactly that of the global-batch loss; with accumulation, micro-batch m uses the
  counts of micro-batches 1..m. The logged value is the exact global-batch loss.
* ``micro_batch``: transformers' ``load_balancing_loss_func`` on each micro-batch alone, averaged with
  token weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..model.moe import router_statistics


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in float32 (logits [N, V], targets [N])."""
    if not torch.is_grad_enabled() or not logits.requires_grad:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return _CrossEntropySum.apply(logits, targets)


class _CrossEntropySum(torch.autograd.Function):
    """sum_i logsumexp(z_i) - z_i[t_i], with the gradient softmax(z) - onehot(t) written in one buffer.

    The same value and gradient as F.cross_entropy(reduction="sum"), in two passes over the [N, V] logits
    instead of five (log_softmax, nll, a zero-filled nll gradient, the log_softmax backward)."""

    @staticmethod
    def forward(ctx, logits, targets):
        z = logits.float()
        lse = torch.logsumexp(z, dim=-1)
        loss = (lse - z.gather(1, targets[:, None]).squeeze(1)).sum()
        ctx.save_for_backward(logits, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        probs = torch.sub(logits.float(), lse[:, None]).exp_()
        probs[torch.arange(len(targets), device=targets.device), targets] -= 1
        return probs.mul_(grad).to(logits.dtype), None


def router_z_sum(router_logits, token_mask: torch.Tensor) -> torch.Tensor:
    """Sum over layers and real tokens of logsumexp(router logits)^2 (ST-MoE's router z-loss)."""
    mask = token_mask.reshape(-1).float()
    return sum((torch.logsumexp(logits.float(), dim=-1).square() * mask).sum() for logits in router_logits)


class BalanceTracker:
    """The balancing term of each micro-batch of one optimizer step, plus the step's exact global value."""

    def __init__(self, mode: str, num_experts: int, top_k: int, total_rows: float,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor], device):
        self.mode, self.num_experts, self.top_k, self.total_rows = mode, num_experts, top_k, float(total_rows)
        self.all_reduce = all_reduce
        self.selected = torch.zeros(num_experts, device=device)  # global counts so far (all ranks)
        self.rows = torch.zeros((), device=device)
        self.prob_sum = torch.zeros(num_experts, device=device)  # this rank's, detached
        self.local_selected = torch.zeros(num_experts, device=device)
        self.micro_value = torch.zeros((), device=device)  # micro_batch mode: weighted sum of per-micro-batch losses

    def loss(self, router_logits, token_mask: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the balancing loss (to be summed over micro-batches and ranks)."""
        selected, prob_sum, rows = router_statistics(router_logits, self.top_k, token_mask)
        self.prob_sum += prob_sum.detach()
        E = self.num_experts
        if self.mode == "global":
            counts = self.all_reduce(torch.cat([selected.detach(), rows.detach().reshape(1)]))
            self.selected += counts[:-1]
            self.rows += counts[-1]
            f = self.selected / self.rows
            return E * torch.sum(f * prob_sum) / self.total_rows
        # micro_batch: this micro-batch's own statistics, weighted by its share of the global rows
        self.local_selected += selected.detach()
        f = selected.detach() / rows.clamp(min=1)
        value = E * torch.sum(f * prob_sum / rows.clamp(min=1)) * rows.detach() / self.total_rows
        self.micro_value += value.detach()
        return value

    def finish(self) -> tuple[float, torch.Tensor]:
        """(logged balancing loss of the step, global top-k counts per expert [E]). Call on every rank."""
        prob_sum = self.all_reduce(self.prob_sum.clone())
        if self.mode == "global":
            f, p = self.selected / self.total_rows, prob_sum / self.total_rows
            return float(self.num_experts * torch.sum(f * p)), self.selected
        selected = self.all_reduce(self.local_selected.clone())
        return float(self.all_reduce(self.micro_value.clone())), selected


def expert_load_summary(selected: torch.Tensor) -> dict:
    """max/mean and coefficient of variation of the expert load (1.0 and 0.0 when perfectly balanced)."""
    mean = selected.mean().clamp(min=1e-9)
    return {"expert_load_max": round(float(selected.max() / mean), 4),
            "expert_load_cv": round(float(selected.std(unbiased=False) / mean), 4)}
