"""Tensor parallel through DTensor (``run.tensor_parallel``): torchrun --nproc-per-node 2, gloo on CPU.

With ``tensor_parallel = 2`` on 2 processes there is one data-parallel group: both ranks train the same
rows, each holding half of every attention head group and half of the MLP columns (ColwiseParallel q/k/v
and gate/up, RowwiseParallel o_proj and down_proj). The curve must be the single-process one for the same
global batch, and the checkpoints (gathered from the shards) must hold the same full HF-layout weights.

Tolerance: the TP run differs from the single process only in float32 summation order (o_proj and
down_proj are two half-width matmuls whose partial sums are added by a gloo all-reduce; the input
gradients of q/k/v and gate/up likewise), ~1e-7 relative per reduction. Measured: losses (~5.6 nats)
agree to 5e-7 over 5 steps, final weights to 1e-6. We allow 2e-5 on losses (a wrong head split, a missing all-reduce or a
gradient counted twice moves the loss by 1e-3 or more). Weights: Adam divides each gradient by its own
running RMS, so an element whose gradient is ~1e-8 (near Adam's eps) turns a 1e-7 relative difference
into a larger one (1e-4 seen after 3 steps at lr 1e-2 in a by-hand check). We allow 1e-4 at lr 3e-3,
as the FSDP2 test does (a wrong shard order or a shard that is not updated moves weights by ~lr = 3e-3).
"""

from __future__ import annotations

import copy

import pytest
import torch

from qwenlab.config import preset
from qwenlab.errors import TrainingError
from qwenlab.train.distributed import check_tensor_parallel
from qwenlab.train.recipes import recipe_from_dict

from .test_train_distributed import records, torchrun
from .test_train_run import TINY_MODEL, _toml, recipe, run

# 4 query heads / 2 KV heads / 64 MLP columns: split 2 ways
TP_MODEL = dict(TINY_MODEL, num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _compare(single, multi, steps, final):
    one, two = records(single), records(multi)
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert abs(one[step]["loss"] - two[step]["loss"]) < 2e-5, (step, one[step]["loss"], two[step]["loss"])
        assert one[step]["targets"] == two[step]["targets"]
        assert abs(one[step]["grad_norm"] - two[step]["grad_norm"]) < 1e-4 * max(1.0, one[step]["grad_norm"])
    assert one[steps]["loss"] < one[1]["loss"] - 0.1  # it trains
    from qwenlab.checkpoint import load_model

    a = load_model(single / "checkpoints" / final / "model", dtype=torch.float32)
    b = load_model(multi / "checkpoints" / final / "model", dtype=torch.float32)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert x.shape == y.shape, name  # full HF-layout tensors, not shards
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=name)
    return a, b


def _tp_recipe(raw: dict, tmp_path):
    """The same recipe with tensor_parallel = 2 and its own run directory (tmp_path / "multi"), as a file."""
    multi = copy.deepcopy(raw)
    multi["run"]["out"] = str(tmp_path / "multi")
    multi["run"]["tensor_parallel"] = 2
    recipe_file = tmp_path / "multi.toml"
    recipe_file.write_text(_toml(multi))
    return recipe_file


def test_tensor_parallel_two_processes_match_one_process(tmp_path):
    """Qwen3 (QK-norm) with tensor_parallel = 2: stopped after step 2, resumed from the TP run's checkpoint."""
    raw = recipe(tmp_path / "single", steps=(5,), seq_len=(32,), global_batch=4, model=TP_MODEL, save_every=2)
    run(raw)
    recipe_file = _tp_recipe(raw, tmp_path)
    proc = torchrun(recipe_file, "--stop-after", "2")
    assert "2 process(es) (1 data-parallel x 2 tensor-parallel), micro-batch 4, accumulation 1" in proc.stderr
    assert (tmp_path / "multi" / "checkpoints" / "step-00000002").is_dir()
    proc = torchrun(recipe_file, "--resume")
    assert "resuming at step 2" in proc.stderr
    _compare(tmp_path / "single", tmp_path / "multi", 5, "step-00000005")
    optimizer = torch.load(tmp_path / "multi" / "checkpoints" / "step-00000005" / "optimizer.pt", weights_only=True)
    full = torch.load(tmp_path / "single" / "checkpoints" / "step-00000005" / "optimizer.pt", weights_only=True)
    assert sorted(optimizer["state"]) == sorted(full["state"])  # every parameter's Adam state, by name
    for key, state in full["state"].items():
        assert optimizer["state"][key]["exp_avg"].shape == state["exp_avg"].shape, key


def test_tensor_parallel_qwen2_with_qkv_bias(tmp_path):
    """Qwen2.5 (q/k/v biases, sharded with their weights; no QK-norm), untied LM head."""
    model = dict(TP_MODEL, tie_word_embeddings=False)
    raw = recipe(tmp_path / "single", steps=(3,), seq_len=(32,), global_batch=4, model=model,
                 preset="qwen2.5-0.5b")
    run(raw)
    recipe_file = _tp_recipe(raw, tmp_path)
    torchrun(recipe_file)
    a, b = _compare(tmp_path / "single", tmp_path / "multi", 3, "step-00000003")
    assert a.config.has_qkv_bias and float(b.model.layers[0].self_attn.k_proj.bias.detach().abs().max()) > 0


def test_tensor_parallel_refuses_what_it_cannot_split():
    config = preset("qwen3-0.6b", **TINY_MODEL)  # 2 query heads, 1 KV head, 64 MLP columns
    with pytest.raises(TrainingError, match=r"tensor_parallel = 2 must divide the model's num_key_value_heads = 1 "):
        check_tensor_parallel(config, 2)
    with pytest.raises(TrainingError, match=r"num_attention_heads = 2, num_key_value_heads = 1, "
                                            r"intermediate_size = 64"):
        check_tensor_parallel(preset("qwen3-0.6b", **TINY_MODEL), 3)
    check_tensor_parallel(preset("qwen3-0.6b", **TP_MODEL), 2)  # fine
    # the recipe: the world must be a multiple of it; not with LoRA
    raw = recipe("unused", model=TP_MODEL, tensor_parallel=2)
    with pytest.raises(TrainingError, match="tensor_parallel = 2 does not divide the world size 1"):
        recipe_from_dict(raw)
    assert recipe_from_dict(raw, world_size=4).tensor_parallel == 2
    with pytest.raises(TrainingError, match="tensor_parallel must be a positive integer"):
        recipe_from_dict(recipe("unused", tensor_parallel=0))
    with pytest.raises(TrainingError, match="not supported with \\[lora\\]"):
        recipe_from_dict({**raw, "lora": {"rank": 4}}, world_size=2)
    # global_batch 4 over 2 data-parallel groups of 2 TP ranks: micro-batch 2
    config = recipe_from_dict(raw, world_size=4)
    assert config.stages[0].micro_rows(4 // 2) == 2
