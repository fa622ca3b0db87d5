"""GGUF import: files written by the ``gguf`` package's GGUFWriter from our random checkpoints load and match
the original (F32 exactly, BF16 / Q8_0 / Q4_0 within the type's tolerance); the engine runs them; corrupt,
foreign or unsupported files are refused with the file, tensor and type named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from qwenlab.checkpoint import load_model
from qwenlab.errors import CheckpointError
from qwenlab.quant.gguf import save_gguf
from tests.conftest import qwenlab_checkpoint

# relative L2 error of the logits: Q8_0 (blocks of 32, fp16 scale) ~ int8; Q4_0 ~ our int4 group 32
TOLERANCE = {"F32": 1e-6, "BF16": 0.02, "Q8_0": 0.03, "Q4_0": 0.35}
PRESETS = {"qwen3-0.6b": {}, "qwen2.5-0.5b": {},
           "qwen3-30b-a3b": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)}


def rel_error(out, ref) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for preset, overrides in PRESETS.items():
        directory = qwenlab_checkpoint(root / preset, preset=preset, seed=2, **overrides)
        out[preset] = (directory, load_model(directory, dtype="float32"))
    return out


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "BF16", "Q4_0"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_gguf_loads_and_matches(tmp_path, originals, preset, qtype):
    directory, original = originals[preset]
    path = save_gguf(original, tmp_path / f"model-{qtype}.gguf", qtype)
    loaded = load_model(path, dtype="float32")
    assert loaded.config.model_type == original.config.model_type
    assert loaded.config.tie_word_embeddings == original.config.tie_word_embeddings
    for field in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "norm_topk_prob", "qkv_bias", "rope_theta", "rms_norm_eps", "vocab_size"):
        assert getattr(loaded.config, field) == getattr(original.config, field), field
    ids = torch.randint(0, 384, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = original(ids)
    error = rel_error(loaded(ids), ref)
    assert error <= TOLERANCE[qtype], error
    if qtype == "F32":
        for name, tensor in original.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_gguf_through_engine_and_quantization(tmp_path, originals):
    from qwenlab import LLM, SamplingParams

    directory, original = originals["qwen2.5-0.5b"]
    path = save_gguf(original, tmp_path / "m.gguf", "F32")
    params = SamplingParams(max_tokens=8, temperature=0)
    prompts = [[3, 14, 15, 92], [65, 35]]
    ours = [o.outputs[0].token_ids for o in LLM(str(directory), dtype="float32").generate(prompts, params)]
    theirs = [o.outputs[0].token_ids for o in LLM(str(path), dtype="float32").generate(prompts, params)]
    assert ours == theirs
    model = load_model(path, dtype="float32", quantization="int8")
    assert model.quantization["method"] == "int8"


def _tiny_writer(path, arch="qwen3"):
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(32)
    writer.add_feed_forward_length(128)
    return writer


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_tensor_type_is_named(tmp_path):
    # one tensor in an i-quant type that qwenlab does not read
    writer = _tiny_writer(tmp_path / "iq2.gguf")
    writer.add_tensor("token_embd.weight", np.zeros((384, 64), dtype=np.float32))
    kind = GGMLQuantizationType.IQ4_NL
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((128, 2 * 18), dtype=np.uint8), raw_dtype=kind)
    _finish(writer)
    with pytest.raises(CheckpointError, match=r"iq2.gguf: tensor 'blk.0.attn_q.weight' has GGUF type IQ4_NL"):
        load_model(tmp_path / "iq2.gguf")


def test_foreign_architecture_and_corrupt_files(tmp_path, originals):
    writer = _tiny_writer(tmp_path / "llama.gguf", arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((384, 64), dtype=np.float32))
    _finish(writer)
    with pytest.raises(CheckpointError, match="llama.gguf: GGUF architecture 'llama' is not supported"):
        load_model(tmp_path / "llama.gguf")

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf: not a readable GGUF file"):
        load_model(junk)

    _, original = originals["qwen3-0.6b"]
    good = save_gguf(original, tmp_path / "good.gguf", "Q8_0")
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_model(cut)

    with pytest.raises(CheckpointError, match="missing.gguf: file not found"):
        load_model(tmp_path / "missing.gguf")


def test_missing_tensor_is_named(tmp_path):
    writer = _tiny_writer(tmp_path / "partial.gguf")
    writer.add_tensor("token_embd.weight", np.zeros((384, 64), dtype=np.float32))
    _finish(writer)
    with pytest.raises(CheckpointError, match=r"partial.gguf: missing tensor for 'lm_head.weight'|"
                                              r"partial.gguf: missing tensor for 'model"):
        load_model(tmp_path / "partial.gguf")
