"""Files shipped inside the package. ``default/`` is the embedded default model (docs/default-model.md):
a small Qwen3 chat model trained by qwenlab itself, used when a command gets no ``--model``."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

DEFAULT_MODEL_NAME = "qwenlab-default"


def default_model_dir() -> Path:
    """The directory of the embedded default model (config.json, model.safetensors, tokenizer files)."""
    path = Path(__file__).resolve().parent / "default"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: the embedded default model is missing from this installation; "
                              "rebuild it with scripts/build_default_model.py or pass --model DIR")
    return path
