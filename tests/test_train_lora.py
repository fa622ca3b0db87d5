"""LoRA: applied == merged, adapter save/load, `qwenlab lora merge` to a checkpoint transformers loads with
the same logits, LoRA training updates only the adapter."""

from __future__ import annotations

import json

import pytest
import torch

from qwenlab.checkpoint import load_model
from qwenlab.errors import TrainingError
from qwenlab.train.lora import (LoRALinear, apply_lora, load_adapter, lora_state_dict, merge_lora, read_adapter,
                                save_adapter)

from .test_train_run import losses, recipe, run

IDS = torch.tensor([[5, 17, 99, 3, 250, 8, 42, 7, 1, 300]])


def randomise_adapters(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora_state_dict(model).items():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def test_lora_applied_equals_merged_and_adapter_roundtrip(tiny_checkpoint, tmp_path):
    directory, hf = tiny_checkpoint("qwen2")  # q/k/v biases: the merge must keep them
    model = load_model(directory, dtype=torch.float32)
    names = apply_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    assert len(names) == 3 * 5 and isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    with torch.no_grad():
        fresh = model(IDS)
        torch.testing.assert_close(fresh, hf(IDS).logits, rtol=1e-5, atol=1e-5)  # B = 0: no change yet
    randomise_adapters(model)
    with torch.no_grad():
        applied = model(IDS)
    assert (applied - fresh).abs().max() > 1e-2
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    save_adapter(lora_state_dict(model), model.lora_config, tmp_path / "adapter", base_model=str(directory))
    config, state = read_adapter(tmp_path / "adapter")
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == sorted(
        ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    assert all(k.startswith("model.layers.") for k in state)
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert raw["lora_alpha"] == 8
    reloaded = load_adapter(load_model(directory, dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS), applied, rtol=0, atol=0)
        merged = merge_lora(reloaded)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(IDS), applied, rtol=1e-5, atol=1e-5)


def test_lora_merge_cli_gives_a_checkpoint_transformers_loads(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from .conftest import run_cli

    directory, _ = tiny_checkpoint("qwen3")
    model = load_model(directory, dtype=torch.float32)
    apply_lora(model, rank=2, alpha=4, targets=["q_proj", "k_proj", "up_proj"])
    randomise_adapters(model, seed=1)
    with torch.no_grad():
        applied = model(IDS)
    save_adapter(lora_state_dict(model), model.lora_config, tmp_path / "adapter")
    run_cli("lora", "merge", "--model", str(directory), "--adapter", str(tmp_path / "adapter"), "--out",
            str(tmp_path / "merged"), "--dtype", "float32", check=True)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, applied, rtol=1e-5, atol=1e-5)
    bad = run_cli("lora", "merge", "--model", str(directory), "--adapter", str(tmp_path), "--out",
                  str(tmp_path / "x"))
    assert bad.returncode == 2 and "not a LoRA adapter" in bad.stderr


def test_lora_refuses_a_tied_head():
    from qwenlab.checkpoint import build_empty
    from qwenlab.config import preset

    model = build_empty(preset("qwen3-0.6b", num_hidden_layers=1, hidden_size=32, intermediate_size=32,
                               vocab_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16),
                        torch.float32)
    with pytest.raises(TrainingError, match="tied"):
        apply_lora(model, targets=["lm_head"])


def test_lora_training_updates_only_the_adapter(tmp_path):
    base_run = recipe(tmp_path / "base", steps=(2,))
    run(base_run)
    base = tmp_path / "base" / "stages" / "01-s1"
    raw = recipe(tmp_path / "lora", steps=(5,), save_every=2)
    raw["model"] = {"checkpoint": str(base), "tokenizer": "byte"}
    raw["lora"] = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}
    raw["optim"] = {"lr": 1e-2, "schedule": "constant"}
    run(raw)
    curve = losses(tmp_path / "lora")
    assert curve[5] < curve[1]
    ckpt = tmp_path / "lora" / "checkpoints" / "step-00000005"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() and not (ckpt / "model").exists()
    export = tmp_path / "lora" / "stages" / "01-s1"
    before, after = load_model(base, dtype=torch.float32), load_model(export, dtype=torch.float32)
    changed = {n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
    adapted = load_adapter(load_model(base, dtype=torch.float32), export / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(adapted(IDS[:, :6]), after(IDS[:, :6]), rtol=1e-5, atol=1e-5)
    # resume a LoRA run from its adapter checkpoint: same losses as the straight run
    raw2 = json.loads(json.dumps(raw))
    raw2["run"]["out"] = str(tmp_path / "lora2")
    run(raw2, stop_after=3)
    run(raw2, resume=True)
    assert losses(tmp_path / "lora2") == curve
