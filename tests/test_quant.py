"""Weight-only int8 / int4 quantization: kernels vs a dequantized reference, logit drift per family,
greedy agreement through the engine, exact save/load round trip, the CLI, and clear errors.

Documented tolerances (docs/quantization.md), relative L2 error of the logits against the unquantized
float32 model on random checkpoints: int8 < 3%, int4 (group 32) < 25% (tiny random models: hidden 64,
where every weight is noise; real checkpoints fare better, see the benchmark's drift column).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import hf_checkpoint, qwenlab_checkpoint, run_cli

from qwenlab.checkpoint import load_model, save_model
from qwenlab.errors import CheckpointError, ConfigError
from qwenlab.quant import (QuantEmbedding, QuantExperts, QuantLinear, dequantize, kernels, layer_method,
                           quant_linear, quantize_int4, quantize_int8, quantize_model, save_quantized, unpack_int4)
from qwenlab.quant import _blockwise_linear, _int4_search_torch

INT8_REL, INT4_REL = 0.03, 0.25


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ---- tensors and kernels ----------------------------------------------------------------------------------------
def test_int8_per_channel_error_bound():
    w = torch.randn(37, 100) * torch.linspace(0.01, 3, 37).unsqueeze(1)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (37,)
    assert q.abs().max() <= 127
    err = (dequantize("int8", q, scales) - w).abs()
    assert (err <= scales.unsqueeze(1) / 2 + 1e-7).all()


def test_int4_asymmetric_format_and_packing():
    w = torch.randn(8, 128) + torch.linspace(-1, 1, 8).unsqueeze(1)  # groups not centred on zero
    packed, scales, mins = quantize_int4(w, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 64) and scales.shape == mins.shape == (8, 2)
    assert scales.dtype == mins.dtype == torch.float16
    codes = unpack_int4(packed)
    assert codes.min() >= 0 and codes.max() <= 15
    # layout: byte j of each run of 32 holds value j (low nibble) and value j + 16 (high nibble)
    assert ((packed[:, :16] & 0x0F) == codes[:, :16]).all()
    assert ((packed[:, :16] >> 4) == codes[:, 16:32]).all()
    deq = dequantize("int4", packed, scales, mins)
    groups = codes.reshape(8, 2, 64).float() * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)
    assert torch.equal(deq, groups.reshape(8, 128))
    # each code is the nearest one to its value for the group's scale and min
    ideal = ((w.reshape(8, 2, 64) - mins.float().unsqueeze(-1)) / scales.float().unsqueeze(-1)).round().clamp(0, 15)
    assert torch.equal(ideal.reshape(8, 128).to(torch.uint8), codes)


def _group_sq_error(w, deq, G):
    return ((deq - w) ** 2).reshape(-1, G).sum(-1)


def test_int4_scale_search_beats_min_max_and_absmax():
    """The searched (scale, min) of every group errs no more than the plain min/max choice, and the whole
    matrix errs well below symmetric absmax (the format before the min)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    G = 64
    searched = dequantize("int4", *quantize_int4(w, G))
    g = w.reshape(-1, G)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    s, m = ((hi - lo) / 15).half().float(), lo.half().float()
    minmax = (((g - m) / s).round().clamp(0, 15) * s + m).reshape(w.shape)
    assert (_group_sq_error(w, searched, G) <= _group_sq_error(w, minmax, G) * (1 + 1e-5) + 1e-12).all()
    a = (g.abs().amax(1, keepdim=True) / 7).half().float()
    absmax = ((g / a).round().clamp(-8, 7) * a).reshape(w.shape)
    assert rel_error(searched, w) < 0.85 * rel_error(absmax, w)


def test_int4_search_kernel_matches_torch():
    torch.manual_seed(1)
    groups = torch.randn(300, 64) * torch.rand(300, 1) + torch.randn(300, 1) * 0.1
    groups[7] = 0.25  # a constant group
    codes, scales, mins = kernels.load().int4_search(groups)
    t_codes, t_scales, t_mins = _int4_search_torch(groups)
    deq = codes.float() * scales.unsqueeze(1) + mins.unsqueeze(1)
    t_deq = t_codes.float() * t_scales.unsqueeze(1) + t_mins.unsqueeze(1)
    assert torch.equal(deq[7], torch.full((64,), 0.25))
    # the same search; float summation order can tip a near-tie to another candidate in a rare group
    ours, theirs = ((deq - groups) ** 2).sum(1), ((t_deq - groups) ** 2).sum(1)
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=1e-7)
    assert abs(ours.sum() / theirs.sum() - 1) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("K", [256, 100])
def test_kernels_match_dequantized_reference(dtype, rows, K):
    """The kernels round activations to int16 per block (error <= 2^-16 of the block's largest value):
    within 5e-4 relative of the exact float product even with a 40x outlier; K = 100 has a partial int8
    block."""
    module = kernels.load()
    assert module is not None, "the AVX2 kernels must build on this machine"
    torch.manual_seed(rows)
    w = torch.randn(70, K) * 0.05
    x = torch.randn(rows, K).to(dtype)
    x[0, 3] = 40.0  # an outlier activation: only its own block's resolution pays for it
    bias = torch.randn(70).to(dtype)
    cases = [("int8", quantize_int8(w), 0)] + ([("int4", quantize_int4(w, 64), 64)] if K % 64 == 0 else [])
    for method, parts, group in cases:
        ref = x.float() @ dequantize(method, *parts).t() + bias.float()
        out = quant_linear(x, method, parts[0], parts[1], group, bias, parts[2] if method == "int4" else None)
        assert out.dtype == dtype and out.shape == (rows, 70)
        if dtype == torch.float32:
            assert rel_error(out, ref) < 5e-4, method
        else:
            torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        # the block-dequantizing path (prefill, other devices) agrees too (plain float products)
        block = _blockwise_linear(x, method, *parts[:2], bias, parts[2] if method == "int4" else None)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(block.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_blockwise_prefill_splits_weight_rows_into_equal_blocks(method, monkeypatch):
    """Prefill's dequantized blocks: 70 rows at most 16 a block run as 5 equal blocks of 14; same product."""
    import qwenlab.quant as quant

    g = torch.Generator().manual_seed(11)
    w, x, bias = torch.randn(70, 128, generator=g) * 0.05, torch.randn(33, 128, generator=g), torch.randn(70, generator=g)
    parts = quantize_int8(w) if method == "int8" else quantize_int4(w, 64)
    ref = x @ dequantize(method, *parts).t() + bias
    calls = []
    real_linear, real_mm = F.linear, torch.mm
    monkeypatch.setattr(quant.F, "linear", lambda a, b, c=None: calls.append(b.shape[0]) or real_linear(a, b, c))
    # float32 activations: the sgemm writes each block's output columns in place (mm with out=)
    monkeypatch.setattr(torch, "mm", lambda a, b, out=None: calls.append(b.shape[1]) or real_mm(a, b, out=out))
    monkeypatch.setattr(quant, "_BLOCK_ROWS", 16)
    mins = parts[2] if method == "int4" else None
    out = _blockwise_linear(x, method, *parts[:2], bias, mins)
    assert calls == [14] * 5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    calls.clear()  # bf16 activations: float products stored to bf16 block by block
    out = _blockwise_linear(x.bfloat16(), method, *parts[:2], bias, mins)
    assert calls == [14] * 5 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x.bfloat16().float() @ dequantize(method, *parts).t() + bias, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_prefill_kernel_within_the_activation_rounding_bound(group):
    """int4 prefill on int8 activation blocks: every output within the bound the rounding allows. Each x is
    rounded to the nearest multiple of amax_g / 127 (amax_g: its group's largest |x|), so an output moves by at
    most sum_g amax_g / 254 * sum_(k in g) |w_k|, plus float rounding. Tails of rows (1-5, 37) and of the
    16-channel blocks (N = 17, 70), K over several 1,024-code chunks, a bias, an outlier activation, float32
    and bf16."""
    module = kernels.load()
    g = torch.Generator().manual_seed(12)
    for rows, N, K in ((1, 17, 4 * group), (2, 70, 4 * group), (3, 17, 4 * group), (4, 33, 4 * group),
                       (5, 16, 4 * group), (37, 70, 4 * group), (7, 20, 2560 if group != 128 else 2688)):
        # the last: K in chunks of 1,024 codes (2 full chunks and a partial one) accumulated across chunks
        w = torch.randn(N, K, generator=g) * 0.05
        parts = quantize_int4(w, group)
        deq = dequantize("int4", *parts)
        x = torch.randn(rows, K, generator=g)
        x[0, 5] = 30.0  # an outlier: only its own group pays for it
        bias = torch.randn(N, generator=g)
        amax = x.abs().reshape(rows, K // group, group).amax(-1)  # [rows, groups]
        wabs = deq.abs().reshape(N, K // group, group).sum(-1)  # [N, groups]
        bound = (amax / 254) @ wabs.t()  # [rows, N]
        ref = x.double() @ deq.double().t() + bias.double()
        out = module.linear_prefill_int4(x, list(parts), bias)
        assert out.dtype == torch.float32 and out.shape == (rows, N)
        excess = (out.double() - ref).abs() - (bound.double() * 1.0001 + 1e-4)
        assert excess.max() <= 0, (rows, N, excess.max().item())
        assert (out.double() - ref).abs().max() > 0  # the activations really were rounded
        xb = x.bfloat16()  # bf16 activations in, bf16 out (one more rounding of the output)
        outb = module.linear_prefill_int4(xb, list(parts), bias)
        assert outb.dtype == torch.bfloat16
        refb = xb.double() @ deq.double().t() + bias.double()
        assert ((outb.double() - refb).abs() - (bound.double() * 1.0001 + 1e-4 + refb.abs() / 128)).max() <= 0


def test_int4_prefill_rows_take_the_prefill_kernel():
    """More than PREFILL_ROWS rows of an int4 layer go to linear_prefill_int4 (int8 keeps the sgemm route)."""
    g = torch.Generator().manual_seed(13)
    w, x = torch.randn(48, 128, generator=g) * 0.05, torch.randn(40, 128, generator=g)
    q, s, m = quantize_int4(w, 64)
    routed = quant_linear(x, "int4", q, s, 64, None, m)
    assert torch.equal(routed, kernels.load().linear_prefill_int4(x, [q, s, m], None))
    q8, s8 = quantize_int8(w)
    torch.testing.assert_close(quant_linear(x, "int8", q8, s8), x @ dequantize("int8", q8, s8).t(), rtol=1e-5, atol=1e-5)
    # non-contiguous int4 storage (a strided view) takes the dequantizing route instead of failing
    q2, s2, m2 = (torch.cat([t, t], 1)[:, :t.shape[1]] for t in (q, s, m))
    assert not q2.is_contiguous()
    torch.testing.assert_close(quant_linear(x, "int4", q2, s2, 64, None, m2), x @ dequantize("int4", q, s, m).t(),
                               rtol=1e-5, atol=1e-5)


def test_dequantize_rows_kernel_matches_the_torch_dequantization():
    """The prefill route's one-pass dequantization: int8 bit-exact, int4 within float rounding (one FMA)."""
    module = kernels.load()
    torch.manual_seed(0)
    w = torch.randn(300, 192) * 0.05
    q8, s8 = quantize_int8(w)
    assert torch.equal(module.dequantize_rows([q8, s8], 0, 300), dequantize("int8", q8, s8))
    assert torch.equal(module.dequantize_rows([q8, s8], 17, 250), dequantize("int8", q8, s8)[17:250])
    for group in (32, 64, 192):
        parts = quantize_int4(w, group)
        ref = dequantize("int4", *parts)
        torch.testing.assert_close(module.dequantize_rows(list(parts), 5, 300), ref[5:], rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="row range"):
        module.dequantize_rows([q8, s8], 10, 301)


def test_kernels_on_the_shared_pool_give_the_same_results():
    """The quantized kernels run on the engine's work pool (one pool per process); 1 or 2 threads agree."""
    from qwenlab.engine import kernels as engine_kernels

    module = kernels.load()
    assert engine_kernels.load() is not None
    w = torch.randn(1000, 512) * 0.05
    x = torch.randn(3, 512)
    parts = list(quantize_int8(w))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = module.linear(x, parts, None)
        torch.set_num_threads(2)
        two = module.linear(x, parts, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_aten_int8pack_fallback_agrees():
    """PyTorch's own int8 weight-only matmul computes the same product (measured in the benchmark)."""
    w, x = torch.randn(48, 64), torch.randn(2, 64)
    q, s = quantize_int8(w)
    ours = quant_linear(x, "int8", q, s, 0)
    theirs = torch.ops.aten._weight_int8pack_mm(x, q, s)
    assert rel_error(ours, theirs) < 1e-4  # ours rounds activations to int16 blocks


def test_int4_group_falls_back_where_it_does_not_divide():
    assert layer_method("int4", 192, 128) == ("int4", 96)
    assert layer_method("int4", 4864, 128) == ("int4", 128)
    assert layer_method("int4", 96, 64) == ("int4", 32)
    assert layer_method("int4", 48, 64) == ("int8", 0)
    assert layer_method("int8", 48, 64) == ("int8", 0)


# ---- whole models ----------------------------------------------------------------------------------------------
FAMILIES = ["qwen2", "qwen3", "qwen3_moe", "qwen2_moe"]


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {family: hf_checkpoint(family, root / family, seed=1)[0] for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_within_tolerance(family, family_checkpoints):
    directory = family_checkpoints[family]
    base = load_model(directory, dtype="float32")
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = base(ids)
    for method, limit in (("int8", INT8_REL), ("int4", INT4_REL)):
        model = load_model(directory, dtype="float32", quantization=method, group_size=32)
        assert rel_error(model(ids), ref) < limit, method
        kinds = {type(m) for m in model.modules()}
        assert QuantLinear in kinds and QuantEmbedding in kinds
        if "moe" in family:
            assert QuantExperts in kinds
            for layer in model.model.layers:  # routers stay unquantized
                assert type(layer.mlp.gate) is torch.nn.Linear
                if layer.mlp.shared_expert_gate is not None:
                    assert type(layer.mlp.shared_expert_gate) is torch.nn.Linear
    # bf16 activations run too and stay close
    model = load_model(directory, dtype="bfloat16", quantization="int8")
    assert rel_error(model(ids), ref) < 0.05


def _peaked_checkpoint(path, preset):
    """A random checkpoint with a confident LM head (logit gaps well above quantization noise), so greedy
    decoding is a meaningful agreement check."""
    directory = qwenlab_checkpoint(path / "src", preset=preset, seed=3, num_hidden_layers=2, hidden_size=128,
                                   intermediate_size=256)
    model = load_model(directory, dtype="float32")
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return save_model(model, path / "peaked")


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen2.5-0.5b"])
def test_greedy_agreement_through_engine(tmp_path, preset):
    from qwenlab import LLM, SamplingParams

    directory = _peaked_checkpoint(tmp_path, preset)
    prompts = [[5, 17, 99, 3], [200, 1, 45], [7] * 9]
    params = SamplingParams(max_tokens=16, temperature=0)

    def greedy(dtype="float32", **kwargs):
        llm = LLM(str(directory), dtype=dtype, kv_cache_memory="16MB", **kwargs)
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]

    reference = greedy()
    assert greedy(quantization="int8") == reference
    int4 = greedy(quantization="int4")
    same = sum(a == b for ref, got in zip(reference, int4) for a, b in zip(ref, got))
    assert same >= 0.75 * sum(len(r) for r in reference)
    # bf16 activations through the engine's CPU kernels (norms, routers) and ours (quantized layers)
    bf16 = greedy(dtype="bfloat16", quantization="int8")
    same = sum(a == b for ref, got in zip(reference, bf16) for a, b in zip(ref, got))
    assert same >= 0.75 * sum(len(r) for r in reference)


# ---- checkpoints ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_save_load_round_trip_is_exact(tmp_path, family, method, family_checkpoints):
    directory = family_checkpoints[family]
    model = load_model(directory, dtype="float32", quantization=method, group_size=32)
    out = save_quantized(model, tmp_path / "q", source=directory)
    config = json.loads((out / "config.json").read_text())
    expected = {"quant_method": "qwenlab", "method": method, "group_size": 32 if method == "int4" else None}
    if method == "int4":
        expected["int4_mins"] = True
    assert config["quantization_config"] == expected
    loaded = load_model(out, dtype="float32")
    assert loaded.quantization == model.quantization
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ids = torch.randint(0, 384, (1, 10))
    assert torch.equal(model(ids), loaded(ids))
    with open(out / "model.safetensors", "rb") as f:  # safetensors: a JSON header, no pickle
        assert f.read(9)[8:9] == b"{"


def test_tied_head_shares_the_embedding(tmp_path):
    directory = qwenlab_checkpoint(tmp_path / "tied", preset="qwen3-0.6b")  # tied embeddings
    model = load_model(directory, dtype="float32", quantization="int8")
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    out = save_quantized(model, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())
    loaded = load_model(out, dtype="float32")
    assert loaded.lm_head.qweight.data_ptr() == loaded.model.embed_tokens.qweight.data_ptr()


def test_quantized_weights_move_to_huge_pages_keeping_values_and_ties(tmp_path):
    from qwenlab.engine import huge_pages
    from qwenlab.quant.fused import move_to_huge_pages

    directory = qwenlab_checkpoint(tmp_path / "tied", preset="qwen3-0.6b")  # tied embeddings
    model = load_model(directory, dtype="bfloat16", quantization="int4", group_size=32)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    ids = torch.randint(0, 384, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids)
    assert huge_pages.enabled()  # Linux with MADV_HUGEPAGE (this project's machines)
    moved = move_to_huge_pages(model, min_bytes=1 << 12)
    assert moved > 0
    embed = model.model.embed_tokens
    assert embed.qweight.data_ptr() % huge_pages.HUGE_PAGE == 0  # the first (largest) tensor starts the mapping
    assert model.lm_head.qweight is embed.qweight and model.lm_head.mins is embed.mins  # still tied
    assert "model.embed_tokens.qweight" in dict(model.named_buffers())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.inference_mode():
        assert torch.equal(model(ids), ref)


def test_quantize_command_and_generate(tmp_path):
    directory = qwenlab_checkpoint(tmp_path / "src", preset="qwen2.5-0.5b", dtype="bfloat16")
    out = tmp_path / "q4"
    proc = run_cli("quantize", "--model", str(directory), "--out", str(out), "--method", "int4", "--group-size", "32")
    assert proc.returncode == 0, proc.stderr
    assert "int4, group size 32" in proc.stdout
    model = load_model(out)
    assert model.quantization["method"] == "int4" and model.lm_head.qweight.dtype == torch.uint8
    assert model.model.norm.weight.dtype == torch.bfloat16
    bad = run_cli("quantize", "--model", str(directory), "--out", str(tmp_path / "x"), "--method", "int4",
                  "--group-size", "40")
    assert bad.returncode == 2 and "multiple of 32" in bad.stderr and "Traceback" not in bad.stderr


# ---- errors --------------------------------------------------------------------------------------------------
def test_bad_methods_and_group_sizes(family_checkpoints):
    directory = family_checkpoints["qwen3"]
    with pytest.raises(ConfigError, match="unknown quantization 'fp8'"):
        load_model(directory, quantization="fp8")
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_model(directory, quantization="int4", group_size=16)
    model = load_model(directory, dtype="float32")
    with pytest.raises(CheckpointError, match="not quantized"):
        save_quantized(model, "/tmp/never")


def test_corrupt_quantized_checkpoints(tmp_path, family_checkpoints):
    model = load_model(family_checkpoints["qwen3"], dtype="float32", quantization="int8")
    out = save_quantized(model, tmp_path / "q")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    # truncated file
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(out)
    # a tensor of the wrong type: int4 config over int8 tensors names the tensor and both types
    weights.write_bytes(data)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"].update(method="int4", group_size=32)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '[\w.]+' is torch\.\w+ \[.*expected"):
        load_model(out)
    # someone else's quantization format
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'gptq' is not supported"):
        load_model(out)


def test_every_model_loading_command_takes_quantization():
    """demo, chat, generate, serve and eval perplexity all accept --quantization int8|int4."""
    from qwenlab.cli import _load_command_modules, build_parser

    _load_command_modules()
    parser = build_parser()
    for command in (["demo"], ["chat"], ["generate", "--prompt", "x"], ["serve"],
                    ["eval", "perplexity", "--model", "m", "--data", "d"]):
        for method in ("int8", "int4"):
            assert parser.parse_args([*command, "--quantization", method]).quantization == method, command


def test_demo_runs_quantized():
    proc = run_cli("demo", "--quantization", "int8")
    assert proc.returncode == 0, proc.stderr
    assert "int8 weights" in proc.stdout and "3. tool call" in proc.stdout


def test_quantization_flag_on_commands(tmp_path):
    directory = qwenlab_checkpoint(tmp_path / "src", preset="qwen3-0.6b")
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join("the cat sat on the mat " * 20 for _ in range(3)))
    losses = {}
    for method in (None, "int4"):
        extra = ["--quantization", method] if method else []
        proc = run_cli("eval", "perplexity", "--model", str(directory), "--data", str(data), "--seq-len", "32",
                       "--max-rows", "2", "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        losses[method] = json.loads(proc.stdout.strip().splitlines()[-1])["loss"]
    assert abs(losses["int4"] - losses[None]) < 0.1 * losses[None]
    proc = run_cli("generate", "--model", str(directory), "--prompt-ids", "1,2,3", "--max-tokens", "4",
                   "--temperature", "0", "--quantization", "int8", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr


# ---- the engine's fused structure for quantized layers ------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3", "qwen2", "qwen3_moe"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_fused_quantized_modules_match_the_stock_modules(family, method, family_checkpoints):
    from qwenlab.quant.fused import QuantKernelAttention, QuantKernelMLP, use_quant_kernels

    # 7 tokens: the decode kernels; 40 (> PREFILL_ROWS): the prefill route (float products, one SwiGLU pass)
    for tokens in (7, 40):
        ids = torch.randint(0, 384, (1, tokens), generator=torch.Generator().manual_seed(2))
        for dtype, tol in (("float32", 1e-3), ("bfloat16", 3e-2)):
            model = load_model(family_checkpoints[family], dtype=dtype, quantization=method, group_size=32)
            with torch.inference_mode():
                ref = model(ids)
                swapped = use_quant_kernels(model)
                kinds = [type(m) for m in model.modules()]
                assert swapped == kinds.count(QuantKernelAttention) + kinds.count(QuantKernelMLP)
                assert kinds.count(QuantKernelAttention) == model.config.num_hidden_layers
                assert (QuantKernelMLP in kinds) == (family != "qwen3_moe")  # MoE layers: experts, not an MLP
                out = model(ids)
            # int8 prefill: the same float products and roundings as the stock ops (1e-5). int4 prefill rounds
            # its activations to int8 blocks: a last-bit difference upstream (the vector exp) can move one
            # rounding step, amax/254 of a block, and later layers carry it (measured 1.6% over 3 layers)
            limit = tol if tokens <= 16 else 1e-5 if method == "int8" else 0.05
            assert rel_error(out, ref) < limit, (dtype, tokens)


@pytest.mark.parametrize("bf16", [False, True])
def test_swiglu_kernel_matches_the_stock_ops(bf16):
    """The prefill SwiGLU pass: silu(gate) * up with the stock bf16 ops' roundings (vector exp, scalar tail)."""
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(37, 301, generator=g) * 4  # 301 columns: a scalar tail on every row
    gate[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -30.0])
    up = torch.randn(37, 301, generator=g)
    got = kernels.load().swiglu(gate.clone(), up, bf16)
    if not bf16:
        torch.testing.assert_close(got, F.silu(gate) * up, rtol=2e-6, atol=1e-30)
        return
    expected = (F.silu(gate.bfloat16()) * up.bfloat16()).float()
    assert torch.equal(got, got.bfloat16().float())  # bf16 values
    differ = got != expected  # the exp's last bits can move a rounding by one bf16 step, rarely
    assert differ.float().mean() < 1e-3
    torch.testing.assert_close(got, expected, rtol=2 ** -7, atol=0)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernels.load().swiglu(gate.bfloat16(), up, True)


def test_engine_routes_quantized_layers_through_the_fused_kernels(tmp_path):
    from qwenlab import LLM
    from qwenlab.quant.fused import QuantKernelAttention, QuantKernelMLP

    directory = qwenlab_checkpoint(tmp_path / "src", preset="qwen3-0.6b")
    llm = LLM(str(directory), dtype="bfloat16", quantization="int4", kv_cache_memory="16MB")
    kinds = {type(m) for m in llm.engine.model.modules()}
    assert QuantKernelAttention in kinds and QuantKernelMLP in kinds


def test_symmetric_int4_checkpoints_from_before_the_mins_still_load(tmp_path, family_checkpoints):
    """A file in the old int4 format (codes q + 8, w = scale * (code - 8), no mins, no int4_mins key) loads
    exactly: min = -8 * scale."""
    from safetensors.torch import load_file, save_file

    model = load_model(family_checkpoints["qwen3"], dtype="float32", quantization="int4", group_size=32)
    out = save_quantized(model, tmp_path / "new", source=family_checkpoints["qwen3"])
    tensors = load_file(str(out / "model.safetensors"))
    old = {name: t for name, t in tensors.items() if not name.endswith("mins")}
    expected = {}
    for name, t in tensors.items():
        if name.endswith("scales") and t.dtype == torch.float16:  # an int4 weight: re-code symmetrically
            prefix = name[: -len("scales")]
            packed = tensors[prefix + "qweight"]
            w = dequantize("int4", packed, t, tensors[prefix + "mins"])
            *lead, n, k = w.shape
            groups = w.reshape(*lead, n, t.shape[-1], -1)
            scales = (groups.abs().amax(-1) / 7).clamp_min(2**-14).half()
            codes = (groups / scales.float().unsqueeze(-1)).round().clamp(-8, 7) + 8
            from qwenlab.quant import pack_int4

            old[prefix + "qweight"] = pack_int4(codes.reshape(*lead, n, k).to(torch.uint8))
            old[name] = scales
            expected[prefix] = ((codes - 8) * scales.float().unsqueeze(-1)).reshape(*lead, n, k)
    save_file(old, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["int4_mins"]
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_model(out, dtype="float32")
    assert loaded.quantization["int4_mins"] is True
    state = loaded.state_dict()
    assert expected
    for prefix, weight in expected.items():
        got = dequantize("int4", state[prefix + "qweight"], state[prefix + "scales"], state[prefix + "mins"])
        assert torch.equal(got, weight), prefix
    ids = torch.randint(0, 384, (1, 6))
    # the old format's own bound (re-coding the new codes symmetrically adds a second rounding)
    assert rel_error(loaded(ids), load_model(family_checkpoints["qwen3"], dtype="float32")(ids)) < 0.35


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_decode_plan_agrees_with_the_module_route(tmp_path, monkeypatch, dtype, method):
    """Whole decode steps in one call (QuantDecodePlan) give the module route's tokens, batched too."""
    from qwenlab import LLM, SamplingParams
    from qwenlab.quant.fused import QuantPlanModel

    directory = _peaked_checkpoint(tmp_path, "qwen2.5-0.5b")  # q/k/v biases, untied head
    prompts = [[5, 17, 99, 3], [200, 1, 45], [7] * 9]
    params = SamplingParams(max_tokens=12, temperature=0)

    def run():
        llm = LLM(str(directory), dtype=dtype, quantization=method, kv_cache_memory="16MB")
        return llm, [out.outputs[0].token_ids for out in llm.generate(prompts, params)]

    llm, fused = run()
    model = llm.engine.model
    assert type(model) is QuantPlanModel and model.__dict__["_quant_plan"][1] is not None
    monkeypatch.setenv("QWENLAB_FUSED_DECODE", "0")
    llm, stock = run()
    assert type(llm.engine.model) is not QuantPlanModel
    assert fused == stock


# ---- other devices (CUDA): the dispatch and the stock-op path, checked on CPU -------------------------------------
def test_device_route_dispatch_and_numerics(monkeypatch):
    """Non-CPU tensors take the stock-op path (dequantization folded into one matmul); the path itself
    runs here on CPU tensors against the dequantized reference. No GPU was available to run it on CUDA."""
    from qwenlab import quant

    assert quant.linear_route(torch.randn(1, 64)) == "kernel"
    assert quant.linear_route(torch.randn(40, 64)) == "blockwise"
    assert quant.linear_route(torch.randn(1, 64, device="meta")) == "device"
    torch.manual_seed(0)
    w, x, bias = torch.randn(48, 128) * 0.05, torch.randn(3, 128), torch.randn(48)
    for method, parts in (("int8", quantize_int8(w)), ("int4", quantize_int4(w, 64))):
        ref = x @ dequantize(method, *parts).t() + bias
        mins = parts[2] if method == "int4" else None
        out = quant._device_linear(x, method, parts[0], parts[1], bias, mins)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out16 = quant._device_linear(x.bfloat16(), method, parts[0], parts[1], bias.bfloat16(), mins)
        assert out16.dtype == torch.bfloat16 and rel_error(out16, ref) < 0.02
        # quant_linear sends a device tensor there (meta: shapes only, like a CUDA tensor without a GPU)
        calls = []
        monkeypatch.setattr(quant, "_device_linear", lambda *a: calls.append(a) or a[0].new_empty(3, 48))
        quant.quant_linear(x.to("meta"), method, parts[0], parts[1], 64, None, mins)
        assert len(calls) == 1
        monkeypatch.undo()
