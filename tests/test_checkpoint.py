"""Checkpoint load/save: sharding, tied heads, expert naming, and every error naming file and tensor."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwenlab
from qwenlab.checkpoint import INDEX_FILE, init_checkpoint, save_model
from qwenlab.config import preset
from qwenlab.errors import CheckpointError, ConfigError
from tests.conftest import hf_classes, qwenlab_checkpoint, run_cli


@pytest.fixture
def ckpt(tmp_path):
    return qwenlab_checkpoint(tmp_path / "ckpt", preset="qwen3-0.6b", tie_word_embeddings=False)


def _rewrite(path, mutate):
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_save_loads_in_both_libraries(tmp_path):
    config = preset("qwen3-30b-a3b", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    vocab_size=512)
    out = init_checkpoint(config, tmp_path / "sharded", dtype="float32", max_shard_size="100KB")
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]  # official per-expert names
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in qwenlab.load_model(out, dtype=None).state_dict().values())
    ours = qwenlab.load_model(out, dtype=torch.float32)
    hf = hf_classes("qwen3_moe")[1].from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(30).view(1, 30)
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-5)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["temperature"] == 0.6 and gen["top_k"] == 20 and gen["top_p"] == 0.95


def test_tied_checkpoint_omits_head_and_ignores_a_stray_one(tmp_path):
    out = qwenlab_checkpoint(tmp_path / "tied", preset="qwen2.5-0.5b", tie_word_embeddings=True)
    names = load_file(out / "model.safetensors").keys()
    assert "lm_head.weight" not in names
    model = qwenlab.load_model(out, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _rewrite(out / "model.safetensors", lambda t: t.__setitem__("lm_head.weight", torch.zeros(384, 64)))
    again = qwenlab.load_model(out, dtype=torch.float32)
    assert torch.equal(again.lm_head.weight, model.model.embed_tokens.weight)


def test_dtype_conversion_on_load(ckpt):
    model = qwenlab.load_model(ckpt)  # default bfloat16 from a float32 checkpoint
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert qwenlab.load_model(ckpt, dtype="float32").lm_head.weight.dtype == torch.float32


def test_save_round_trip_is_exact(ckpt, tmp_path):
    model = qwenlab.load_model(ckpt, dtype=None)
    save_model(model, tmp_path / "copy")
    again = qwenlab.load_model(tmp_path / "copy", dtype=None)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


# ---- errors ---------------------------------------------------------------------------------------
def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        qwenlab.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        qwenlab.load_model(tmp_path / "empty")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Qwen/Qwen3-0.6B: not a local directory and could not be downloaded"):
        qwenlab.load_model("Qwen/Qwen3-0.6B")


def test_unsupported_model_type_and_inconsistent_config(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        qwenlab.load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ConfigError, match="not divisible"):
        qwenlab.load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, "head_dim": 33}))
    with pytest.raises(ConfigError, match="head_dim must be even"):
        qwenlab.load_model(ckpt)


def test_shard_named_in_index_but_missing(tmp_path):
    out = init_checkpoint(preset("qwen3-0.6b", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, intermediate_size=64, vocab_size=512),
                          tmp_path / "s", dtype="float32", max_shard_size="50KB")
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard named in {INDEX_FILE} is missing"):
        qwenlab.load_model(out)


def test_truncated_and_corrupt_files(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor '[\w.]+' ends at byte"):
        qwenlab.load_model(ckpt)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        qwenlab.load_model(ckpt)
    path.write_bytes(struct.pack("<Q", 40) + b"{this is not json at all, really!!!!!!!}" + data[48:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        qwenlab.load_model(ckpt)
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(CheckpointError, match="header claims"):
        qwenlab.load_model(ckpt)


def test_missing_unexpected_and_misshapen_tensors(ckpt):
    path = ckpt / "model.safetensors"
    original = path.read_bytes()
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.self_attn.k_norm.weight'"):
        qwenlab.load_model(ckpt)
    path.write_bytes(original)
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        qwenlab.load_model(ckpt)
    path.write_bytes(original)
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 64)))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight' has shape \[64, 64\], "
                                              r"the config implies \[128, 64\]"):
        qwenlab.load_model(ckpt)


def test_pickle_checkpoint_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never unpickles checkpoints. Convert them to safetensors"):
        qwenlab.load_model(ckpt)


def test_cli_errors_are_one_line_exit_2(ckpt, tmp_path):
    (ckpt / "model.safetensors").write_bytes(b"12345")
    for args in (["inspect", "--model", str(ckpt)], ["inspect", "--model", str(tmp_path / "none")],
                 ["plan", "--preset", "qwen9"], ["init", "--preset", "qwen3-0.6b", "--out", str(tmp_path / "x"),
                                                 "--set", "num_key_value_heads=3"]):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"qwenlab {args[0]}: error: "), proc.stderr
        assert "Traceback" not in proc.stderr


def test_init_cli_writes_checkpoint_both_libraries_load(tmp_path):
    out = tmp_path / "init"
    run_cli("init", "--preset", "qwen2-57b-a14b", "--out", str(out), "--set", "num_hidden_layers=2",
            "--set", "hidden_size=64", "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2",
            "--set", "intermediate_size=96", "--set", "moe_intermediate_size=32", "--set", "num_experts=4", "--set", "num_experts_per_tok=2",
            "--set", "shared_expert_intermediate_size=48", "--set", "vocab_size=256", "--seed", "7",
            "--dtype", "float32", check=True)
    ours = qwenlab.load_model(out, dtype=torch.float32)
    hf = hf_classes("qwen2_moe")[1].from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-5)
    assert ours.config.num_experts == 4 and ours.config.has_shared_expert


def test_plan_cli(tmp_path):
    proc = run_cli("plan", "--preset", "qwen3-30b-a3b", "--context", "32768", "--batch", "4", "--memory", "80GiB",
                   "--json", check=True)
    plan = json.loads(proc.stdout)
    assert plan["params_total"] == 30_532_122_624 and plan["params_active"] == 3_352_961_024 or \
        round(plan["params_active"] / 1e9, 3) == 3.353
    assert plan["kv_bytes_per_token"] == 2 * 48 * 4 * 128 * 2  # K and V, 48 layers, 4 KV heads, bf16
    assert plan["gqa_saving"] == 8.0 and plan["fits"] is True
    assert plan["kv_bytes_total"] == plan["kv_bytes_per_token"] * 32768 * 4
    table = run_cli("plan", "--preset", "qwen3-235b-a22b", "--memory", "80GiB", check=True).stdout
    assert "does NOT fit" in table and "GQA saves 16.0x" in table


LOAD_RSS_SCRIPT = """
import sys, torch, psutil, gc
import qwenlab
gc.collect()
before = psutil.Process().memory_info().rss
model = qwenlab.load_model(sys.argv[1], dtype=torch.bfloat16, progress=False)
# VmHWM: this process's own peak (ru_maxrss would include the parent's memory from before exec)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(before, peak, size)
"""


def test_loading_peak_rss_is_close_to_checkpoint_size(tmp_path):
    out = init_checkpoint(preset("qwen3-0.6b", num_hidden_layers=4), tmp_path / "rss", dtype="bfloat16")
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
    before, peak, size = map(int, subprocess.run([sys.executable, "-c", LOAD_RSS_SCRIPT, str(out)], check=True,
                                                 capture_output=True, text=True).stdout.split())
    file_size = (out / "model.safetensors").stat().st_size
    assert size > 300e6 and abs(file_size - size) < 1e6
    assert peak - before <= 1.3 * size, f"loading grew RSS by {(peak - before) / size:.2f}x the checkpoint size"
