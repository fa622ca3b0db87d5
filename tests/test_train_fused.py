"""The training-only fused operations (hand-written backward) give the values and gradients of the plain
composition they replace, in float32: LM head + cross-entropy, RMSNorm, RoPE, the MoE expert block (idle
experts included, with and without grouped_mm), the training attention (the kernels' and the blocked
one), and clipping folded into the fused AdamW."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenlab.model import fused, moe
from qwenlab.model.layers import rotate_half


def _grads(fn, inputs, grad_out=None):
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(grad_out if grad_out is not None else None)
    return out.detach().clone(), [t.grad.clone() for t in inputs]


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    for x, y in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def _kernels(monkeypatch, on: bool):
    """The compiled kernels' training passes (on), or the stock-op route they replace (off)."""
    if on:
        assert fused.cpu_kernels() is not None, "the CPU kernels must build on this machine"
    else:
        monkeypatch.setattr(fused, "_CPU_KERNELS", [None])


@pytest.mark.parametrize("vocab_block", [1024, 128])
@pytest.mark.parametrize("kernels", [True, False])
def test_linear_cross_entropy_matches_the_composition(monkeypatch, kernels, vocab_block):
    _kernels(monkeypatch, kernels)  # vocabulary 300: the vector passes leave a tail of 4
    monkeypatch.setattr(fused, "_CPU_VOCAB_BLOCK", vocab_block)  # 128: the logits in blocks 128, 128, 44
    g = torch.Generator().manual_seed(0)
    h = torch.randn(70, 24, generator=g).requires_grad_()
    w = (torch.randn(300, 24, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, 300, (70,), generator=g)
    plain = _grads(lambda: F.cross_entropy(F.linear(h, w), t, reduction="sum") * 0.37, [h, w])
    for _ in range(2):  # the second call reuses the logits buffer
        ours = _grads(lambda: fused.linear_cross_entropy_sum(h, w, t) * 0.37, [h, w])
        _close(plain, ours)
    with torch.no_grad():  # no gradient: the plain path
        assert torch.allclose(fused.linear_cross_entropy_sum(h, w, t), plain[0] / 0.37)


@pytest.mark.parametrize("kernels", [True, False])
def test_rms_norm_and_rope_match_the_composition(monkeypatch, kernels):
    _kernels(monkeypatch, kernels)  # rows of 20: the vector passes leave a tail of 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 20, generator=g).requires_grad_()
    weight = (1 + 0.1 * torch.randn(20, generator=g)).requires_grad_()
    grad = torch.randn(2, 5, 3, 20, generator=g)

    def plain_norm():
        x32 = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return weight * x32

    _close(_grads(plain_norm, [x, weight], grad), _grads(lambda: fused.rms_norm(x, weight, 1e-6), [x, weight], grad))
    q = torch.randn(2, 5, 3, 20, generator=g).transpose(1, 2).requires_grad_()  # [B, heads, S, hd], strided
    angles = torch.randn(2, 5, 20, generator=g)  # halves not repeated: the two halves' sin must not mix up
    cos, sin = angles.cos(), angles.sin()
    grad = torch.randn(2, 3, 5, 20, generator=g)

    def plain_rope():
        return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)

    _close(_grads(plain_rope, [q], grad), _grads(lambda: fused.apply_rope(q, cos, sin), [q], grad))


@pytest.mark.parametrize("kernels,grouped,threads", [(True, True, 1), (True, True, 2), (False, True, 1),
                                                     (False, False, 1)])
def test_moe_training_function_matches_the_composition(monkeypatch, grouped, kernels, threads):
    """kernels: the compiled SwiGLU passes and grouped matmuls (experts spread over the threads); else
    torch's grouped_mm or (grouped False) the loop of matmuls."""
    _kernels(monkeypatch, kernels)  # intermediate size 20: the vector SwiGLU passes leave a tail of 4
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _moe_training_function_matches_the_composition(monkeypatch, grouped)
    finally:
        torch.set_num_threads(previous)


def _moe_training_function_matches_the_composition(monkeypatch, grouped):
    g = torch.Generator().manual_seed(2)
    experts = moe.Experts(8, 32, 20)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(8, 40, 32, generator=g) * 0.2)
        experts.down_proj.copy_(torch.randn(8, 32, 20, generator=g) * 0.2)
    x = torch.randn(40, 32, generator=g).requires_grad_()
    logits = torch.randn(40, 8, generator=g)
    logits[:, 3] = logits[:, 6] = -1e9  # two experts receive no token
    logits.requires_grad_()
    grad = torch.randn(40, 32, generator=g)
    params = [x, logits, experts.gate_up_proj, experts.down_proj]

    def run():
        weights, ids = torch.softmax(logits, -1).topk(2, -1)
        return experts(x, ids, weights / weights.sum(-1, keepdim=True))

    if not grouped:
        monkeypatch.setattr(moe, "_grouped_mm", None)
    ours = _grads(run, params, grad)
    _close(ours, _grads(run, params, grad))  # again, in the reused buffers (fused.POOL)
    monkeypatch.setattr(fused, "wants_fused", lambda *t: False)
    plain = _grads(run, params, grad)
    _close(plain, ours)
    assert float(ours[1][2][3].abs().max()) == 0.0 and float(ours[1][3][6].abs().max()) == 0.0


def test_grouped_matmul_kernels_check_their_counts():
    ops = fused.cpu_kernels()
    assert ops is not None, "the CPU kernels must build on this machine"
    a, b = torch.randn(6, 4), torch.randn(2, 4, 3)
    out = torch.empty(6, 3)
    ops.grouped_mm_rows(a, b, [2, 4], out)
    torch.testing.assert_close(out, torch.cat([a[:2] @ b[0], a[2:] @ b[1]]))
    with pytest.raises(RuntimeError, match="counts must add up to the rows"):
        ops.grouped_mm_rows(a, b, [2, 3], out)
    with pytest.raises(RuntimeError, match="negative count"):
        ops.grouped_mm_weights(a, torch.randn(6, 3), [7, -1], torch.empty(2, 4, 3))


def test_buffer_pool_hands_out_only_buffers_nothing_else_holds():
    pool = fused.BufferPool(per_key=2)

    def take(shape=(4, 8)):
        return pool.empty("k", shape, torch.float32, torch.device("cpu"))

    a, b = take(), take()
    kept = {a.data_ptr(), b.data_ptr()}
    assert len(kept) == 2
    view = a[1:]  # a view keeps a's storage in use
    del a
    c = take((2, 8))
    assert c.data_ptr() not in kept  # both kept buffers in use: a fresh one, not kept (two a key)
    del c
    w = torch.ones(32, requires_grad=True)
    saved = b.view(-1).fill_(3.0)
    loss = (w * saved).sum()  # autograd saves b's storage for the backward
    del b, saved
    d = take()
    assert d.data_ptr() not in kept and len(pool.buffers[("k", torch.float32)]) == 2
    loss.backward()
    assert torch.equal(w.grad, torch.full((32,), 3.0))
    del loss, view, d
    e, f = take(), take()
    assert {e.data_ptr(), f.data_ptr()} == kept  # all released: both reused
    del e, f
    g = take((5, 8))  # larger than both, which are free: they are dropped for it
    assert g.data_ptr() not in kept and len(pool.buffers[("k", torch.float32)]) == 1
    assert pool.empty("k", (3,), torch.float32, torch.device("meta")).device.type == "meta"  # not pooled


def test_embedding_matches_the_module():
    g = torch.Generator().manual_seed(4)
    module = torch.nn.Embedding(50, 8)
    ids = torch.randint(0, 50, (3, 40), generator=g)  # repeated ids: their gradients add up
    grad = torch.randn(3, 40, 8, generator=g)
    plain = _grads(lambda: module(ids), [module.weight], grad)
    for _ in range(2):  # the second backward reuses the gradient buffer
        _close(plain, _grads(lambda: fused.embedding(ids, module), [module.weight], grad))
    padded = torch.nn.Embedding(50, 8, padding_idx=int(ids[0, 0]))  # module options: the module itself runs
    out, (grad_weight,) = _grads(lambda: fused.embedding(ids, padded), [padded.weight], grad)
    assert float(grad_weight[padded.padding_idx].abs().max()) == 0.0


def test_linear_cross_entropy_keeps_its_saved_logits_across_forwards():
    # a second forward before the first graph's second backward (retain_graph) must not reuse its logits
    g = torch.Generator().manual_seed(3)
    h1, h2 = torch.randn(2, 30, 16, generator=g).unbind(0)
    w = torch.randn(100, 16, generator=g).requires_grad_()
    t = torch.randint(0, 100, (30,), generator=g)
    first = fused.linear_cross_entropy_sum(h1, w, t)
    first.backward(retain_graph=True)
    grad = w.grad.clone()
    w.grad = None
    fused.linear_cross_entropy_sum(h2, w, t).backward()
    w.grad = None
    first.backward()
    torch.testing.assert_close(w.grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("route", ["kernel", "blocked"])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("B,h,kv,S,d,threads", [(2, 4, 2, 2 * fused.ATTENTION_BLOCK + 22, 16, 1),
                                                 (1, 7, 1, 600, 24, 2)])
def test_training_attention_matches_sdpa(route, documents, B, h, kv, S, d, threads):
    """Causal (and document-masked) attention with grouped KV heads: the kernels' training attention (the
    route TrainingAttention takes on CPU) and the blocked attention (without the kernels) give sdpa's
    output and gradients, over several query blocks with a partial last one, keys across 256-key blocks,
    documents starting inside blocks, and two threads."""
    from qwenlab.engine import kernels
    from qwenlab.train.trainer import TrainingAttention

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(4)
        q = torch.randn(B, S, h, d, generator=g).transpose(1, 2).requires_grad_()  # the model's strides
        k = torch.randn(B, S, kv, d, generator=g).transpose(1, 2).requires_grad_()
        v = torch.randn(B, S, kv, d, generator=g).transpose(1, 2).requires_grad_()
        grad = torch.randn(B, h, S, d, generator=g)
        doc_ids = torch.zeros(B, S, dtype=torch.long)
        if documents:  # row 0: documents of 40, 100 (or 300) and the rest; any other row a single document
            doc_ids[0, 40:] = 1
            doc_ids[0, 140 if S < 500 else 340:] = 2
        context = TrainingAttention(doc_ids)
        assert fused.wants_kernel_attention(q, k, v)
        if route == "kernel":
            assert context._kernel()[0] is not None, "the kernels' attention must be available on this machine"
            attend = lambda: context.attend(0, q, k, v, 0.3)  # noqa: E731
        else:
            assert fused.wants_blocked_attention(q, k, v)
            attend = lambda: fused.blocked_attention(q, k, v, 0.3, context.mask)  # noqa: E731

        def plain():
            if documents:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=context.mask, scale=0.3, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)

        # dK / dV sum over up to 600 x 7 rows: float32 accumulation differs from sdpa's by a few 1e-6
        _close(_grads(plain, [q, k, v], grad), _grads(attend, [q, k, v], grad), rtol=2e-5, atol=5e-6)
        if route == "kernel":  # what the Function saved: out, the log-sum-exp of the scaled scores (, P)
            ops = kernels.load()
            with torch.no_grad():
                first = context._kernel()[1]
                first = q.new_empty(0, dtype=torch.int32) if first is None else first
                out, lse, probs = ops.attention_forward(q, k, v, 0.3, first, True)
                # rows of up to 256 tokens keep their probabilities for the backward; longer rows recompute
                assert (probs.numel() > 0) == (S <= 256)
                scores = (q.double() @ k.double().repeat_interleave(h // kv, 1).transpose(-1, -2)) * 0.3
                allowed = context.mask if documents else torch.ones(S, S, dtype=torch.bool).tril()
                expected = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1)
            torch.testing.assert_close(lse.double(), expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)
    long = torch.zeros(1, 16, 2048, 8, requires_grad=True)  # 138 MB of probabilities: not the blocked one
    assert not fused.wants_blocked_attention(long, long[:, :4], long[:, :4])
    assert fused.wants_kernel_attention(long, long[:, :4], long[:, :4])  # the kernel saves O(S) per row
    with torch.no_grad():
        assert not fused.wants_blocked_attention(q, k, v) and not fused.wants_kernel_attention(q, k, v)


def test_document_first_key():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert fused.document_first_key(doc_ids).tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6]
    # a document id in two separate spans is not a key range per token: the mask route stays
    assert fused.document_first_key(torch.tensor([[0, 0, 1, 1, 0, 0]])) is None


def test_clipping_folded_into_fused_adamw(monkeypatch):
    from qwenlab.train import distributed as D
    from qwenlab.train.recipes import OptimConfig
    from qwenlab.train.trainer import _clip_into_optimizer, _grad_norm, build_optimizer

    def model_and_optimizer():
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 10
        return model, build_optimizer(model, OptimConfig(lr=1e-2, fused=True))

    a, opt_a = model_and_optimizer()
    norm_a = _grad_norm(a, 1.0)
    opt_a.step()
    b, opt_b = model_and_optimizer()
    norm_b = _clip_into_optimizer(b, opt_b, 1.0, D.DistInfo())
    assert norm_b is not None and abs(norm_a - norm_b) < 1e-4 * norm_a and norm_a > 1.0  # it clips
    assert hasattr(opt_b, "grad_scale")
    opt_b.step()
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_moe_training_steps_with_activation_checkpointing_match():
    """Two MoE training steps (the reused buffers taken, released and taken again; under activation
    checkpointing the recomputed forward takes them while the first forward's are gone) give the same
    parameters with and without recomputation."""
    import copy

    import numpy as np

    from qwenlab.config import preset
    from qwenlab.model.qwen import QwenForCausalLM
    from qwenlab.train import distributed as D
    from qwenlab.train.data import Rows
    from qwenlab.train.recipes import MoEConfig, OptimConfig
    from qwenlab.train.trainer import build_optimizer, training_step

    config = preset("qwen3-30b-a3b", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=16, bos_token_id=94, eos_token_id=95)
    plain = QwenForCausalLM(config)
    plain.init_weights(seed=0)
    recomputed = copy.deepcopy(plain)
    D.apply_activation_checkpointing(recomputed)
    ids = np.random.default_rng(0).integers(0, 94, (2, 24))
    labels = np.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    rows = Rows(ids, labels, np.tile(np.arange(24), (2, 1)), np.zeros_like(ids), np.ones_like(ids, dtype=bool))
    for model in (plain, recomputed):
        model.train()
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
        model.losses = [training_step(model, optimizer, rows, MoEConfig(balance="global"), 1.0, 2, D.DistInfo())["loss"]
                        for _ in range(2)]
    assert plain.losses == pytest.approx(recomputed.losses, rel=1e-6, abs=1e-6)
    for x, y in zip(plain.parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
