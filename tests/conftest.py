"""Shared test helpers: small random checkpoints of every family, built offline.

``hf_checkpoint(family, directory, **overrides)`` builds a random model with *transformers* (the reference)
and saves it with ``save_pretrained``; ``qwenlab_checkpoint(...)`` writes one with qwenlab's own
``init_checkpoint``. Both give a directory that both libraries load.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Small shapes that still exercise every switch: GQA (4 query heads over 2 KV heads), head_dim != H/nh
# for the Qwen3 families, several experts with top-2.
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0)
FAMILY_EXTRA = {
    "qwen2": dict(),
    "qwen3": dict(head_dim=32),
    "qwen3_moe": dict(head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False),
}


def hf_classes(family: str):
    import transformers as tf

    return {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
    }[family]


def hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of the family (float32, eval mode)."""
    config_cls, model_cls = hf_classes(family)
    kwargs = {**TINY, **FAMILY_EXTRA[family], **overrides}
    rope_scaling = kwargs.pop("rope_scaling", None)
    theta = kwargs.pop("rope_theta")
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(rope_scaling or {})}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # transformers leaves norms at 1; randomise them so norm bugs show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def hf_checkpoint(family: str, directory: Path, seed: int = 0, **overrides) -> tuple[Path, object]:
    model = hf_model(family, seed, **overrides)
    model.save_pretrained(directory)
    return Path(directory), model


def qwenlab_checkpoint(directory: Path, preset: str = "qwen3-0.6b", seed: int = 0, dtype: str = "float32",
                       **overrides) -> Path:
    from qwenlab.checkpoint import init_checkpoint
    from qwenlab.config import preset as make_preset

    small = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=384)
    if make_preset(preset).qk_norm:
        small["head_dim"] = 32
    config = make_preset(preset, **{**small, **overrides})
    return init_checkpoint(config, directory, seed=seed, dtype=dtype)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint(family="qwen3", **overrides) -> (directory, transformers model)."""
    counter = iter(range(1000))

    def make(family: str = "qwen3", seed: int = 0, **overrides):
        return hf_checkpoint(family, tmp_path / f"{family}-{next(counter)}", seed=seed, **overrides)

    return make


def run_cli(*args: str, check: bool = False, timeout: float = 300, env: dict | None = None):
    """Run the real ``qwenlab`` command in a subprocess."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "qwenlab", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"qwenlab {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc
