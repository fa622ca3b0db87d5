"""qwenlab: Qwen2.5 / Qwen3 / Qwen3-MoE in one readable PyTorch codebase."""

from .checkpoint import load_model
from .config import ModelConfig, preset
from .errors import CheckpointError, ConfigError, QwenlabError, RequestError

__version__ = "0.1.0"


def __getattr__(name):  # heavy parts imported on first use
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    if name in ("LLM", "SamplingParams"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'qwenlab' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "load_model", "Tokenizer", "ModelConfig", "preset", "QwenlabError",
           "ConfigError", "CheckpointError", "RequestError"]
