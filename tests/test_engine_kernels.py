"""CPU bf16 kernels against float32 references, and a bf16 engine running on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenlab.engine import kernels
from qwenlab.engine.attention import gather_decode_attention
from tests.conftest import hf_checkpoint
from tests.test_engine_helpers import (LogitsRecorder, assert_logits_match, greedy, make_engine, random_prompts, run_all,
                                      single_thread)

_threads = pytest.fixture(autouse=True)(single_thread)


@pytest.fixture(scope="module")
def ops():
    module = kernels.load()
    if module is None:
        pytest.skip("CPU kernels unavailable here (no AVX2/FMA or no C++ compiler)")
    return module


@pytest.mark.parametrize("M,K,N", [(1, 64, 40), (2, 72, 13), (3, 100, 9), (5, 64, 33), (7, 13, 5), (9, 64, 21), (17, 13, 21), (40, 96, 70)])
def test_linear_bf16(ops, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K)
    w = torch.randn(N, K, generator=g).bfloat16()
    bias = torch.randn(N, generator=g)
    x = torch.randn(2, M, K, generator=g)
    expected = F.linear(x, w.float(), bias)
    got = ops.linear_bf16(x, w, bias)
    assert got.shape == (2, M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got16 = ops.linear_bf16(x.bfloat16(), w, None)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), F.linear(x.bfloat16().float(), w.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention(ops, cache_dtype):
    g = torch.Generator().manual_seed(0)
    blocks, bs, kv_heads, heads, dim = 20, 4, 2, 6, 40
    k_cache = torch.randn(blocks, bs, kv_heads, dim, generator=g).to(cache_dtype)
    v_cache = torch.randn(blocks, bs, kv_heads, dim, generator=g).to(cache_dtype)
    tables = torch.tensor([[3, 7, 1, 0], [9, 2, 0, 0], [5, 6, 8, 11]], dtype=torch.int32)
    lens = torch.tensor([10, 5, 16], dtype=torch.int32)
    q = torch.randn(3, heads, dim, generator=g)
    expected = gather_decode_attention(q, k_cache.float(), v_cache.float(), tables, lens, 0.3)
    torch.testing.assert_close(ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.3), expected,
                               rtol=1e-5, atol=1e-5)


def _causal_reference(q, k, v, scale, offset):
    """float64 attention with the bottom-right causal mask (query i sees keys <= offset + i), GQA by repeat."""
    n, ctx = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    keys, values = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q.double() @ keys.transpose(-1, -2)) * scale
    visible = torch.arange(ctx)[None, :] <= torch.arange(offset, offset + n)[:, None]
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ values


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,n,offset,scale", [
    (6, 2, 40, 77, 0, 0.16),     # head_dim not a multiple of 8, n not a multiple of the row blocks
    (7, 7, 64, 300, 0, 0.125),   # no GQA; keys cross a 256-key block
    (14, 2, 64, 520, 0, 0.125),  # Qwen2.5-0.5B's groups (7 heads a KV head: 18-row blocks)
    (4, 1, 128, 1, 9, 0.09),     # one query after 9 cached tokens
    (4, 2, 32, 100, 700, 0.18),  # a later chunk: every key block before the chunk's own
    (4, 2, 16, 40, 0, 3.0),      # large scores (up to ~100): the running maximum and rescaling must hold
])
def test_prefill_attention(ops, threads, dtype, heads, kv_heads, dim, n, offset, scale):
    torch.set_num_threads(threads)  # the autouse fixture restores the count
    g = torch.Generator().manual_seed(n + offset + heads)
    ctx = offset + n
    # the engine's layout: [1, T, heads, dim] projections seen as [1, heads, T, dim] (strided)
    q = torch.randn(1, n, heads, dim, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(1, ctx, kv_heads, dim, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(1, ctx, kv_heads, dim, generator=g).to(dtype).transpose(1, 2)
    got = ops.prefill_attention(q, k, v, scale, offset)
    assert got.shape == (1, heads, n, dim) and got.dtype == dtype
    expected = _causal_reference(q, k, v, scale, offset)
    # float32: the scores' own rounding, relative to their size (~scale * sqrt(dim)); bf16: the output's rounding
    tol = 2e-6 * max(1.0, scale * dim ** 0.5) if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    if offset == 0 and n > 1:  # and the same as the SDPA call it replaces, within the same rounding
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=heads != kv_heads)
        torch.testing.assert_close(got.float(), sdpa.float(), rtol=tol * 2, atol=tol * 2)


def test_prefill_attention_rejects_bad_input(ops):
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.prefill_attention(q, q[:, :2].bfloat16(), q[:, :2], 0.3, 0)
    with pytest.raises(RuntimeError, match="shapes"):
        ops.prefill_attention(q, q[:, :2], q[:, :2], 0.3, 1)  # 5 queries after 1 cached token need 6 keys


def test_moe_experts(ops):
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(6, 20, 24, generator=g) * 0.3).bfloat16()
    down = (torch.randn(6, 24, 10, generator=g) * 0.3).bfloat16()
    x = torch.randn(5, 24, generator=g)
    ids = torch.tensor([[0, 3], [3, 5], [1, 0], [5, 2], [3, 4]])
    weights = torch.rand(5, 2, generator=g)
    expected = torch.zeros(5, 24)
    for t in range(5):
        for j in range(2):
            gate, up = (gate_up[ids[t, j]].float() @ x[t]).chunk(2)
            expected[t] += weights[t, j] * (down[ids[t, j]].float() @ (F.silu(gate) * up))
    got = ops.moe_experts_bf16(x, ids, weights, gate_up, down)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "qwen2_moe"])
def test_bf16_engine_on_kernels_tracks_float32(ops, family, tmp_path):
    """bf16 weights through the kernels: logits close to a float32 forward of the same bf16 weights."""
    directory, hf = hf_checkpoint(family, tmp_path / family, seed=2, initializer_range=0.1)
    engine = make_engine(directory, dtype="bfloat16", use_kernels=True)
    assert any(type(m) is kernels.KernelLinear for m in engine.model.modules())
    recorder = LogitsRecorder(engine)
    prompts = random_prompts([7, 19], seed=3)
    finished = run_all(engine, {f"r{i}": (p, greedy(6)) for i, p in enumerate(prompts)})
    reference = hf.bfloat16().float()
    for i, prompt in enumerate(prompts):
        ids = finished[f"r{i}"].outputs[0].token_ids
        with torch.no_grad():
            ref = reference(torch.tensor([prompt + ids])).logits[0]
        for j, row in enumerate(recorder.rows[(f"r{i}", 0)]):
            expected = ref[len(prompt) - 1 + j]
            assert (row - expected).abs().max() / expected.abs().max() < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rounds_like_transformers(ops, dtype):
    from qwenlab.model.layers import RMSNorm

    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, 48) * 3).to(dtype)
    expected = norm(x)
    got = ops.rms_norm(x, norm.weight, 1e-6)
    assert got.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 8e-3  # one bf16 rounding step at most
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_fused_attention_and_mlp_modules_match_the_stock_modules(ops, family):
    from qwenlab.config import preset
    from qwenlab.model.layers import CausalAttention, RotaryEmbedding
    from qwenlab.model.qwen import QwenForCausalLM

    base = "qwen3-0.6b" if family == "qwen3" else "qwen2.5-0.5b"
    config = preset(base, num_hidden_layers=1, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64, **({"head_dim": 32} if family == "qwen3" else {}))
    model = QwenForCausalLM(config)
    model.init_weights(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.uniform_(0.5, 1.5)
    model = model.bfloat16().eval()
    layer = model.model.layers[0]
    x = torch.randn(1, 7, 64).bfloat16()
    cos, sin = RotaryEmbedding(config)(torch.arange(3, 10), torch.bfloat16)
    with torch.no_grad():
        attn_ref, mlp_ref = layer.self_attn(x, cos, sin, CausalAttention()), layer.mlp(x)
        assert kernels.use_bf16_kernels(model) > 0
        assert type(layer.self_attn) is kernels.KernelAttention and type(layer.mlp) is kernels.KernelMLP
        attn, mlp = layer.self_attn(x, cos, sin, CausalAttention()), layer.mlp(x)
    for got, ref in ((attn, attn_ref), (mlp, mlp_ref)):
        assert got.dtype == torch.bfloat16 and got.shape == ref.shape
        assert ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < 2e-2


def test_work_pool_with_two_threads_gives_the_same_results(ops):
    """The kernels' own thread pool (two threads here): same answers, many calls in a row, nested calls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(5)
        for M in (1, 3, 9, 40):
            w = torch.randn(515, 96, generator=g).bfloat16()
            x = torch.randn(M, 96, generator=g)
            expected = F.linear(x, w.float())
            for _ in range(20):
                torch.testing.assert_close(ops.linear_bf16(x, w, None), expected, rtol=1e-5, atol=1e-5)
        ops.set_blas_min_rows(16)  # the BLAS route for many rows
        try:
            x = torch.randn(40, 96, generator=g)
            torch.testing.assert_close(ops.linear_bf16(x, w, None), F.linear(x, w.float()), rtol=1e-5, atol=1e-5)
            # 2,500 weight rows: three equal blocks of 834 (the last 832), float output written in place
            # by the sgemm, bf16 output through the rounding store; with a bias
            wide, bias = torch.randn(2500, 96, generator=g).bfloat16(), torch.randn(2500, generator=g)
            expected = F.linear(x, wide.float(), bias)
            torch.testing.assert_close(ops.linear_bf16(x, wide, bias), expected, rtol=1e-5, atol=1e-5)
            xb = x.bfloat16()
            out = ops.linear_bf16(xb, wide, bias)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out, F.linear(xb.float(), wide.float(), bias).bfloat16(), rtol=0, atol=0)
        finally:
            ops.set_blas_min_rows(128)  # the default
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("family,threads", [("qwen3", 1), ("qwen2", 2)])
def test_fused_decode_step_is_bit_identical_to_the_module_route(ops, family, threads, tmp_path):
    """A decode step in one kernel call (fused_decode.py) gives exactly the module route's logits: alone,
    batched with late arrivals (several decode rows, mixed prefill steps), q/k norms or q/k/v biases."""
    directory, _ = hf_checkpoint(family, tmp_path / family, seed=4, initializer_range=0.1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = {}
        for fused in (True, False):
            engine = make_engine(directory, dtype="bfloat16", use_kernels=True)
            assert engine.runner.fused is not None
            if not fused:
                engine.runner.fused = None
            else:
                calls = []
                run = engine.runner.fused.run
                engine.runner.fused.run = lambda *a: calls.append(1) or run(*a)
            recorder = LogitsRecorder(engine)
            prompts = random_prompts([5, 11, 3], seed=6)
            run_all(engine, {"a": (prompts[0], greedy(10))}, late={"b": (prompts[1], greedy(8)),
                                                                   "c": (prompts[2], greedy(6))})
            rows[fused] = recorder.rows
            if fused:
                assert len(calls) >= 8  # most steps were decode-only (several rows in some)
        assert rows[True].keys() == rows[False].keys()
        for key in rows[False]:
            assert len(rows[True][key]) == len(rows[False][key])
            for got, expected in zip(rows[True][key], rows[False][key]):
                assert torch.equal(got, expected), key
    finally:
        torch.set_num_threads(previous)


def test_fused_decode_is_used_only_where_it_applies(ops, tmp_path):
    directory, _ = hf_checkpoint("qwen2_moe", tmp_path / "moe", seed=1)
    assert make_engine(directory, dtype="bfloat16", use_kernels=True).runner.fused is None  # MoE layers
    directory, _ = hf_checkpoint("qwen3", tmp_path / "dense", seed=1)
    assert make_engine(directory, dtype="float32", use_kernels=True).runner.fused is None  # float32
    assert make_engine(directory, dtype="bfloat16", use_kernels=True).runner.fused is not None


def test_argmax_bf16_matches_torch(ops):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 1003, generator=g).bfloat16()
    x[1, 17] = x[1, 900] = 50.0  # a tie: the first index
    x[2, :] = float("-inf")  # all -inf: index 0
    x[3, 5] = float("nan")  # a NaN counts as the maximum
    x[3, 999] = 100.0
    assert ops.argmax_bf16(x).tolist() == x.argmax(-1).tolist() == [int(x[0].float().argmax()), 17, 0, 5]
    y = torch.randn(3, 151936, generator=g).bfloat16()
    assert ops.argmax_bf16(y).tolist() == y.argmax(-1).tolist()


def test_huge_pages_move_keeps_values_and_ties(monkeypatch):
    from torch import nn

    from qwenlab.engine import huge_pages

    monkeypatch.setattr(huge_pages, "CHUNK", 1 << 16)  # exercise the early release of a large parameter's pages
    model = nn.Sequential(nn.Embedding(512, 256), nn.Linear(256, 512, bias=False), nn.LayerNorm(256))
    model[1].weight = model[0].weight  # tied
    model = model.bfloat16()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    old_ptr = model[0].weight.data_ptr()
    assert huge_pages.enabled()  # Linux with MADV_HUGEPAGE (this project's machines)
    moved = huge_pages.move_to_huge_pages(model, min_bytes=1 << 16)
    assert moved == 1  # the tied matrix once; the small norm stays
    assert model[0].weight.data_ptr() != old_ptr and model[0].weight.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert model[1].weight is model[0].weight
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_kv_cache_on_huge_pages(tmp_path, monkeypatch):
    """The CPU KV cache lives in one MADV_HUGEPAGE mapping: zero-filled, 2 MiB-aligned, non-overlapping
    tensors; QWENLAB_HUGE_PAGES=0 turns it off (plain torch.zeros)."""
    from qwenlab.engine import huge_pages

    a, b = huge_pages.zeros([(3, 4, 2, 8), (5, 7)], torch.bfloat16)
    assert a.shape == (3, 4, 2, 8) and b.shape == (5, 7) and a.dtype == b.dtype == torch.bfloat16
    assert not a.any() and not b.any()
    assert a.data_ptr() % huge_pages.HUGE_PAGE == 0 and b.data_ptr() % huge_pages.HUGE_PAGE == 0
    a.fill_(1.5)
    assert not b.any() and bool((a == 1.5).all())
    directory, _ = hf_checkpoint("qwen3", tmp_path / "q3", seed=3)
    caches = make_engine(directory).runner.kv_caches
    assert all(t.data_ptr() % huge_pages.HUGE_PAGE == 0 for pair in caches for t in pair)
    assert len({t.data_ptr() for pair in caches for t in pair}) == 2 * len(caches)
    monkeypatch.setenv("QWENLAB_HUGE_PAGES", "0")
    assert huge_pages.zeros([(2,)], torch.float32) is None
    k, v = make_engine(directory).runner.kv_caches[0]
    assert not k.any() and not v.any()


@pytest.mark.parametrize("use_kernels", [True, False])
def test_chunked_prefill_with_and_without_the_kernels_matches_transformers(use_kernels, tmp_path):
    """Later prefill chunks attend over the cached prefix: the kernels' prefill attention (offset) and the
    SDPA route without kernels (bottom-right causal mask) both give transformers' logits."""
    directory, hf = hf_checkpoint("qwen3", tmp_path / "q3", seed=5)
    engine = make_engine(directory, max_num_batched_tokens=7, use_kernels=use_kernels)
    assert (engine.kernels is not None) == use_kernels
    recorder = LogitsRecorder(engine)
    prompts = random_prompts([23, 16], seed=6)
    finished = run_all(engine, {f"r{i}": (p, greedy(4)) for i, p in enumerate(prompts)})
    for i, prompt in enumerate(prompts):
        assert_logits_match(hf, prompt, finished[f"r{i}"].outputs[0].token_ids, recorder.rows[(f"r{i}", 0)])
