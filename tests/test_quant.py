"""Weight-only int8 / int4 quantization: kernels vs a dequantized reference, logit drift per family,
greedy agreement through the engine, exact save/load round trip, the CLI, and clear errors.

Documented tolerances (docs/quantization.md), relative L2 error of the logits against the unquantized
float32 model on random checkpoints: int8 < 3%, int4 (group 32) < 35% (tiny random models: hidden 64,
where every weight is noise; real checkpoints fare better, see the benchmark's drift column).
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import hf_checkpoint, qwenlab_checkpoint, run_cli

from qwenlab.checkpoint import load_model, save_model
from qwenlab.errors import CheckpointError, ConfigError
from qwenlab.quant import (QuantEmbedding, QuantExperts, QuantLinear, dequantize, kernels, layer_method,
                           quant_linear, quantize_int4, quantize_int8, quantize_model, save_quantized, unpack_int4)
from qwenlab.quant import _blockwise_linear

INT8_REL, INT4_REL = 0.03, 0.35


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


def test_int4_grouped_error_bound_and_packing():
    w = torch.randn(8, 128)
    packed, scales = quantize_int4(w, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 64) and scales.shape == (8, 2)
    assert scales.dtype == torch.float16
    codes = unpack_int4(packed)
    assert codes.min() >= -8 and codes.max() <= 7
    # layout: byte j of each run of 32 holds value j (low nibble) and value j + 16 (high nibble)
    assert ((packed[:, :16] & 0x0F).to(torch.int8) - 8 == codes[:, :16]).all()
    assert ((packed[:, :16] >> 4).to(torch.int8) - 8 == codes[:, 16:32]).all()
    err = (dequantize("int4", packed, scales) - w).abs().reshape(8, 2, 64)
    assert (err <= scales.float().unsqueeze(-1) / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
def test_kernels_match_dequantized_reference(dtype, rows):
    module = kernels.load()
    assert module is not None, "the AVX2 kernels must build on this machine"
    torch.manual_seed(rows)
    w = torch.randn(70, 256) * 0.05
    x = torch.randn(rows, 256).to(dtype)
    bias = torch.randn(70).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for method, (q, s), group in (("int8", quantize_int8(w), 0), ("int4", quantize_int4(w, 64), 64)):
        ref = x.float() @ dequantize(method, q, s).t() + bias.float()
        out = quant_linear(x, method, q, s, group, bias)
        assert out.dtype == dtype and out.shape == (rows, 70)
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
        # the block-dequantizing path (prefill, other devices) agrees too
        torch.testing.assert_close(_blockwise_linear(x, method, q, s, bias).float(), ref, rtol=tol, atol=tol)


def test_aten_int8pack_fallback_agrees():
    """PyTorch's own int8 weight-only matmul computes the same product (measured in the benchmark)."""
    w, x = torch.randn(48, 64), torch.randn(2, 64)
    q, s = quantize_int8(w)
    ours = quant_linear(x, "int8", q, s, 0)
    theirs = torch.ops.aten._weight_int8pack_mm(x, q, s)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


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
    assert config["quantization_config"] == {"quant_method": "qwenlab", "method": method,
                                             "group_size": 32 if method == "int4" else None}
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
