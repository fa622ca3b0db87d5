"""Real multi-process training: torchrun --nproc-per-node 2, gloo on CPU, FSDP2 (fully_shard).

A tiny Qwen3-MoE model trains two stages (the second raises seq_len and the RoPE base) with the
global-batch balancing loss, is stopped after step 4 and resumed from its sharded-run checkpoint. The
same recipe in one process gives the same global batch per step (1 rank x 4 rows vs 2 ranks x 2 rows),
so losses, balancing losses, held-out loss and final weights must agree.

Tolerance: the runs differ only in float32 summation order (a 4-row batch reduced in one matmul vs two
2-row halves summed by a gloo reduce-scatter, and a different thread split), ~1e-7 relative per
reduction. Adam turns gradient differences into update differences of the same relative size; measured,
the losses (~5.6 nats) agree to 5e-7 over 5 steps. We allow 2e-5 on losses and 1e-4 on weights: far
below the effect of any real bug (a wrong row split, normalisation or missing all-reduce moves the loss
by 1e-3 or more).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import torch

from .conftest import REPO
from .test_train_run import TINY_MOE, _toml, recipe, run


def torchrun(recipe_file, *args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "-m", "qwenlab", "train", str(recipe_file), "--no-progress", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def records(run_dir, kind="train"):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind}


def test_fsdp2_two_processes_match_one_process(tmp_path):
    raw = recipe(tmp_path / "single", steps=(3, 2), seq_len=(32, 64), global_batch=4, model=TINY_MOE,
                 preset="qwen3-30b-a3b", save_every=2)
    raw["moe"] = {"balance": "global", "aux_coef": 0.1}
    raw["stages"][1]["rope_theta"] = 40000.0
    raw["stages"][1]["eval"] = [{"path": "synthetic:words?docs=20&seed=9"}]
    raw["stages"][1]["eval_rows"] = 4
    run(raw)
    multi = copy.deepcopy(raw)
    multi["run"]["out"] = str(tmp_path / "multi")
    recipe_file = tmp_path / "multi.toml"
    recipe_file.write_text(_toml(multi) + '[moe]\nbalance = "global"\naux_coef = 0.1\n')
    # interrupted after step 4 (mid stage 2, checkpoint at 4), then resumed: still the single-process curve
    proc = torchrun(recipe_file, "--stop-after", "4")
    assert "2 process(es), micro-batch 2, accumulation 1" in proc.stderr
    assert (tmp_path / "multi" / "checkpoints" / "step-00000004").is_dir()
    assert not (tmp_path / "multi" / "checkpoints" / "step-00000005").exists()
    proc = torchrun(recipe_file, "--resume")
    assert "resuming at step 1" in proc.stderr

    one, two = records(tmp_path / "single"), records(tmp_path / "multi")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        for key in ("loss", "ce", "aux"):
            assert abs(one[step][key] - two[step][key]) < 2e-5, (step, key, one[step][key], two[step][key])
        assert one[step]["tokens"] == two[step]["tokens"] and one[step]["targets"] == two[step]["targets"]
    assert one[5]["aux"] != one[4]["aux"]  # the balancing term is live, not a constant
    held_one, held_two = records(tmp_path / "single", "eval"), records(tmp_path / "multi", "eval")
    assert abs(held_one[5]["eval_loss"] - held_two[5]["eval_loss"]) < 2e-5

    # checkpoints written by the sharded run hold the full weights and optimizer state
    from qwenlab.checkpoint import load_model

    ckpt = tmp_path / "multi" / "checkpoints" / "step-00000005"
    a = load_model(tmp_path / "single" / "checkpoints" / "step-00000005" / "model", dtype=torch.float32)
    b = load_model(ckpt / "model", dtype=torch.float32)
    assert b.config.rope_theta == 40000.0
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=name)
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(list(b.parameters()))
