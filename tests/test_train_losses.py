"""Training losses against transformers, global-batch MoE balancing, schedules, FLOP counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qwenlab.checkpoint import load_model
from qwenlab.model.moe import load_balancing_loss
from qwenlab.train.data import Rows
from qwenlab.train.recipes import MoEConfig, OptimConfig
from qwenlab.train.trainer import StepLoss, flops_per_token, learning_rate


def plain_rows(ids: torch.Tensor) -> Rows:
    """One document per row, labels = next token (what transformers does with labels=input_ids)."""
    B, S = ids.shape
    labels = np.full((B, S), -100, np.int64)
    labels[:, :-1] = ids[:, 1:].numpy()
    return Rows(ids.numpy(), labels, np.tile(np.arange(S), (B, 1)), np.zeros((B, S), np.int64), np.ones((B, S), bool))


def step_loss(model, rows: Rows, micro: int, balance: str = "global", z: float = 0.0):
    """Loss of one optimizer step split into micro-batches of ``micro`` rows (backward included)."""
    loss = StepLoss(model.config, MoEConfig(balance=balance, z_loss_coef=z), rows, lambda t: t, "cpu")
    for first in range(0, len(rows), micro):
        loss.micro_batch(model, rows.slice(first, first + micro)).backward()
    return loss.finish()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe", "qwen2_moe"])
def test_loss_and_gradients_equal_transformers(tiny_checkpoint, family):
    """CE (+ router_aux_loss_coef x load-balancing loss for MoE) equals transformers' loss within 1e-5 in
    float32, and so do the gradients (the balancing frequencies carry no gradient in either)."""
    extra = {"router_aux_loss_coef": 0.1} if "moe" in family else {}
    directory, hf = tiny_checkpoint(family, **extra)
    model = load_model(directory, dtype=torch.float32)
    ids = torch.randint(0, 384, (3, 24), generator=torch.Generator().manual_seed(1))
    ours = step_loss(model, plain_rows(ids), micro=3)
    kwargs = {"output_router_logits": True} if "moe" in family else {}
    hf.train()
    ref = hf(ids, labels=ids, **kwargs)
    ref.loss.backward()
    assert abs(ours["loss"] - float(ref.loss.detach())) < 1e-5
    if "moe" in family:
        assert abs(ours["aux"] - float(ref.aux_loss.detach())) < 1e-5
    ours_grads = dict(model.named_parameters())
    assert {name for name, _ in hf.named_parameters()} <= set(ours_grads)  # every tensor compared
    for name, param in hf.named_parameters():
        if name in ours_grads and param.grad is not None:
            torch.testing.assert_close(ours_grads[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_global_balancing_is_split_invariant_and_micro_batch_is_not(tiny_checkpoint):
    """The logged global-batch balancing loss is the loss of the whole batch however it is split into
    micro-batches; transformers' per-micro-batch loss depends on the split."""
    directory, _ = tiny_checkpoint("qwen3_moe")
    model = load_model(directory, dtype=torch.float32)
    ids = torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(2))
    rows = plain_rows(ids)
    with torch.no_grad():
        whole = load_balancing_loss(model(ids, output_router_logits=True).router_logits, 8, 2)
    one = step_loss(model, rows, micro=4)
    four = step_loss(model, rows, micro=1)
    assert abs(one["aux"] - float(whole)) < 1e-6 and abs(four["aux"] - float(whole)) < 1e-6
    micro = step_loss(model, rows, micro=1, balance="micro_batch")
    with torch.no_grad():
        per_row = [float(load_balancing_loss(model(ids[i:i + 1], output_router_logits=True).router_logits, 8, 2))
                   for i in range(4)]
    assert abs(micro["aux"] - sum(per_row) / 4) < 1e-6
    assert abs(micro["aux"] - float(whole)) > 1e-4
    assert one["expert_load_max"] >= 1.0 and one["expert_load_cv"] >= 0.0


def test_router_z_loss(tiny_checkpoint):
    directory, _ = tiny_checkpoint("qwen3_moe")
    model = load_model(directory, dtype=torch.float32)
    ids = torch.randint(0, 384, (2, 8), generator=torch.Generator().manual_seed(3))
    metrics = step_loss(model, plain_rows(ids), micro=2, z=0.01)
    with torch.no_grad():
        logits = model(ids, output_router_logits=True).router_logits
    expected = torch.cat([torch.logsumexp(x, -1).square() for x in logits]).mean()
    assert abs(metrics["z_loss"] - float(expected)) < 1e-5
    assert abs(metrics["loss"] - (metrics["ce"] + 0.001 * metrics["aux"] + 0.01 * metrics["z_loss"])) < 1e-9


def test_learning_rate_schedules():
    cos = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, schedule="cosine")
    values = [learning_rate(cos, s, 20) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[3:], values[4:])) and values[-1] > 0.1
    wsd = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.25)
    values = [learning_rate(wsd, s, 20) for s in range(20)]
    assert values[:15] == [1.0] * 15 and values[-1] == 0.0 and values[15] == 0.8
    assert learning_rate(OptimConfig(lr=0.5, schedule="constant"), 99, 100) == 0.5


def test_flops_per_token_counts_active_parameters():
    from qwenlab.config import preset

    dense = preset("qwen3-8b")
    n = dense.param_counts()["total"] - dense.vocab_size * dense.hidden_size
    assert flops_per_token(dense, 4096) == 6 * n + 12 * 36 * 32 * 128 * 4096
    moe = preset("qwen3-30b-a3b")
    active = moe.param_counts()["active"] - moe.vocab_size * moe.hidden_size
    assert math.isclose(flops_per_token(moe, 0), 6 * active)
    assert 6 * 3.0e9 < flops_per_token(moe, 0) < 6 * 3.4e9  # "A3B": about 3.3B active parameters
