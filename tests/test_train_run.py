"""Training runs end to end (one process): overfitting, exact resume, SIGKILL, crash while saving, the
three-stage recipe with its long-context stage, gradient accumulation."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwenlab.errors import TrainingError
from qwenlab.train.recipes import load_recipe, recipe_from_dict
from qwenlab.train.trainer import train

from .conftest import REPO, run_cli

TINY_MODEL = dict(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, rope_theta=10000.0, max_position_embeddings=128,
                  tie_word_embeddings=True)
TINY_MOE = dict(TINY_MODEL, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                norm_topk_prob=True)


def recipe(out, steps=(6,), seq_len=(32,), global_batch=4, micro_batch=0, data="synthetic:words?docs=300&seed=1",
           model=None, preset="qwen3-0.6b", **run) -> dict:
    """A raw recipe dict (what the TOML parses to) for tiny CPU runs."""
    stages = []
    for i, (n, s) in enumerate(zip(steps, seq_len)):
        stages.append({"name": f"s{i + 1}", "steps": n, "seq_len": s, "global_batch": global_batch,
                       "micro_batch": micro_batch, "data": [{"path": data}]})
    return {"run": {"out": str(out), "seed": 0, "progress": False, "threads": 1, **run},
            "model": {"preset": preset, "tokenizer": "byte", "overrides": dict(model or TINY_MODEL)},
            "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine"},
            "stages": stages}


def losses(run_dir, kind="train", key="loss") -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == kind:
            out[record["step"]] = record[key]
    return out


def run(raw: dict, **kwargs) -> dict:
    return train(recipe_from_dict(raw), **kwargs)


def test_tiny_model_overfits_a_small_corpus(tmp_path):
    """16 random 24-byte documents with distinct first bytes, packed two per 50-token row (24 bytes + eos
    each, so no document is ever cut): every label is determined by the document's earlier tokens, so a
    model that memorises the corpus drives the loss to ~0 (from ln 272 = 5.6 nats at init). Below 0.1
    nats/token means > 90% probability on the right byte almost everywhere: impossible without memorising."""
    import random

    from qwenlab.train.data import prepare

    rng = random.Random(0)
    docs = [chr(65 + i) + "".join(chr(rng.randrange(33, 127)) for _ in range(23)) for i in range(16)]
    prepare([], tmp_path / "corpus", documents=docs, workers=1, progress=False)
    raw = recipe(tmp_path / "run", steps=(150,), seq_len=(50,), global_batch=8, data=str(tmp_path / "corpus"),
                 model=dict(TINY_MODEL, hidden_size=64, intermediate_size=128, num_attention_heads=4))
    raw["optim"] = {"lr": 1e-2, "warmup_steps": 10, "schedule": "constant", "weight_decay": 0.0}
    summary = run(raw)
    curve = losses(tmp_path / "run")
    assert curve[1] > 5.0
    assert summary["stages"][0]["final_loss"] < 0.1, summary


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    """Two stages (the second raises seq_len and the RoPE base, and applies YaRN); stop at step 7, resume from the step-6
    checkpoint: every logged loss, eval included, is bit-identical to the straight run (float32, CPU)."""
    raw = recipe(tmp_path / "straight", steps=(4, 5), seq_len=(32, 64), save_every=3)
    raw["stages"][1]["rope_theta"] = 40000.0
    raw["stages"][1]["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
    raw["stages"][1]["eval"] = [{"path": "synthetic:words?docs=20&seed=9"}]
    raw["stages"][1]["eval_rows"] = 4
    raw["stages"][1]["eval_every"] = 2
    run(raw)
    raw2 = copy.deepcopy(raw)
    raw2["run"]["out"] = str(tmp_path / "resumed")
    summary = run(raw2, stop_after=7)
    assert summary.get("stopped")
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-00000004",
                                                                                         "step-00000006"]
    with pytest.raises(TrainingError, match="--resume"):
        run(raw2)
    run(raw2, resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 9
    assert losses(tmp_path / "resumed", "eval", "eval_loss") == losses(tmp_path / "straight", "eval", "eval_loss")
    config = json.loads((tmp_path / "resumed" / "stages" / "02-s2" / "config.json").read_text())
    assert config["rope_theta"] == 40000.0 and config["rope_scaling"]["rope_type"] == "yarn"
    # keep_last = 2
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-00000006",
                                                                                         "step-00000009"]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, capsys):
    """A real `qwenlab train` process killed with SIGKILL mid-run (possibly mid-checkpoint) resumes from its
    last complete checkpoint and reproduces the uninterrupted run's losses exactly. Constant LR, so the
    killed run can be given a very long schedule (it must still be running when killed)."""
    base = recipe(tmp_path / "ref", steps=(24,), save_every=4)
    base["optim"] = {"lr": 2e-3, "schedule": "constant"}
    run(base)
    killed = copy.deepcopy(base)
    killed["run"]["out"] = str(tmp_path / "killed")
    killed["stages"][0]["steps"] = 100000
    recipe_file = tmp_path / "killed.toml"
    recipe_file.write_text(_toml(killed))
    proc = subprocess.Popen([sys.executable, "-m", "qwenlab", "train", str(recipe_file)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 10:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    from qwenlab.train.checkpointing import CheckpointManager

    latest = CheckpointManager(tmp_path / "killed", None).latest()
    assert latest is not None and "step-00000008" <= latest.name < "step-00000024", latest
    train(load_recipe(recipe_file, ["stages.0.steps=24"]), resume=True)
    assert "differs from the one this checkpoint was written with" in capsys.readouterr().err
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")


def _toml(raw: dict) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for section in ("run", "model", "optim"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in raw[section].items()]
    for stage in raw["stages"]:
        lines.append("[[stages]]")
        lines += [f"{k} = {value(v)}" for k, v in stage.items()]
    return "\n".join(lines) + "\n"


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import qwenlab.train.checkpointing as checkpointing
    from qwenlab.checkpoint import load_model

    real = checkpointing.write_hf_checkpoint
    calls = []

    def dies_on_second_save(state, config, directory, **kwargs):
        calls.append(directory)
        if len(calls) == 2:  # the step-4 checkpoint: some bytes written, then the process "dies"
            directory.mkdir(parents=True)
            (directory / "model.safetensors").write_bytes(b"partial")
            raise OSError("No space left on device")
        return real(state, config, directory, **kwargs)

    monkeypatch.setattr(checkpointing, "write_hf_checkpoint", dies_on_second_save)
    raw = recipe(tmp_path / "run", steps=(6,), save_every=2)
    with pytest.raises(OSError, match="No space"):
        run(raw)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step-00000004", "step-00000002"]
    assert checkpointing.CheckpointManager(tmp_path / "run", None).latest().name == "step-00000002"
    model = load_model(checkpoints / "step-00000002" / "model", dtype=torch.float32)
    assert model(torch.tensor([[1, 2, 3]])).isfinite().all()
    monkeypatch.undo()
    run(raw, resume=True)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004", "step-00000006"]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]


def test_three_stage_recipe_end_to_end(tmp_path):
    """recipes/tiny.toml, shortened: the long-context stage raises seq_len 128 -> 512 and rope_theta 1e4 -> 1e5."""
    config = load_recipe(REPO / "recipes" / "tiny.toml", [f"run.out={tmp_path / 'tiny'}", "stages.*.steps=3",
                                                          "stages.*.eval_rows=2", "run.progress=false",
                                                          "run.save_every=0"])
    summary = train(config)
    assert [s["name"] for s in summary["stages"]] == ["general", "stem-code", "long-context"]
    assert all(s["final_loss"] < 10 and s["eval_loss"] < 10 for s in summary["stages"])
    configs = [json.loads((tmp_path / "tiny" / "stages" / name / "config.json").read_text())
               for name in ("01-general", "02-stem-code", "03-long-context")]
    assert [c["rope_theta"] for c in configs] == [10000.0, 10000.0, 100000.0]
    assert configs[2]["max_position_embeddings"] >= 512
    records = [json.loads(line) for line in (tmp_path / "tiny" / "log.jsonl").read_text().splitlines()]
    long_stage = [r for r in records if r["kind"] == "train" and r["stage"] == "long-context"]
    assert long_stage[0]["tokens"] == 4 * 512 and long_stage[0]["step"] == 7
    assert (tmp_path / "tiny" / "loss.png").stat().st_size > 10_000
    # the export is a checkpoint transformers loads
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny" / "stages" / "03-long-context")
    assert hf.config.rope_parameters["rope_theta"] == 100000.0
    # held-out perplexity of the export, as `qwenlab eval perplexity` computes it
    from qwenlab.train.data import synthetic_documents
    from qwenlab.train.evaluate import perplexity

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_documents("long", 4, 97)))
    result = perplexity(tmp_path / "tiny" / "stages" / "03-long-context", heldout, seq_len=512, progress=False)
    assert result["tokens"] > 500 and abs(result["perplexity"] - math.exp(result["loss"])) < 1e-9
    assert result["loss"] < 5.0  # trained: below a uniform guess over the 259 byte symbols (5.56 nats)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """4 rows in one micro-batch vs 4 micro-batches of 1 row (with activation checkpointing): the same
    step up to float32 summation order. bf16 autocast runs and stays close."""
    big = recipe(tmp_path / "big", steps=(3,), global_batch=4, micro_batch=4)
    small = recipe(tmp_path / "small", steps=(3,), global_batch=4, micro_batch=1, activation_checkpointing=True)
    bf16 = recipe(tmp_path / "bf16", steps=(3,), global_batch=4, micro_batch=2, mixed_precision="bfloat16")
    run(big)
    run(small)
    run(bf16)
    a, b, c = losses(tmp_path / "big"), losses(tmp_path / "small"), losses(tmp_path / "bf16")
    assert a.keys() == b.keys() == c.keys() == {1, 2, 3}
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
        assert abs(a[step] - c[step]) < 0.05, (step, a[step], c[step])


def test_data_outside_the_vocabulary_is_refused(tmp_path):
    raw = recipe(tmp_path / "run", model=dict(TINY_MODEL, vocab_size=200))
    with pytest.raises(TrainingError, match="does not fit the model's vocabulary of 200"):
        run(raw)


def test_bad_recipe_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nout = "x"\n[model]\npreset = "qwen3-0.6b"\ntokenizer = "byte"\n[[stages]]\nname = "a"\n'
                   'steps = 2\nseq_len = 16\nglobal_batch = 3\nmicro_batch = 2\ndata = ["synthetic:words"]\n')
    proc = run_cli("train", str(bad))
    assert proc.returncode == 2 and "global_batch 3 is not a multiple of micro_batch 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(TrainingError, match=r"unknown field\(s\): nope"):
        load_recipe(bad, ["stages.0.nope=1"])
    with pytest.raises(TrainingError, match="needs exactly one of preset"):
        load_recipe(bad, ["model.checkpoint=/x"])
    config = load_recipe(bad, ["stages.*.global_batch=4", "optim.lr=0.5", "stages.0.optim.warmup_steps=3"])
    assert config.stages[0].optim.lr == 0.5 and config.stages[0].optim.warmup_steps == 3
