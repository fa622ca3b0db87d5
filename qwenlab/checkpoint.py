"""Hugging Face checkpoints in and out: config.json + safetensors (single or sharded with an index).

Loading builds the model on the meta device, allocates each parameter once, and reads every tensor's
bytes from the file straight into its parameter (``readinto``; a dtype change goes through one
tensor-sized buffer), so peak memory stays close to the model's own size: no state dict, no second
copy, no mapped pages left resident. Every problem names the file and the tensor. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig, canonical_dtype
from .errors import CheckpointError, ConfigError
from .model.qwen import QwenForCausalLM

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_IGNORED_RE = re.compile(r"rotary_emb\.inv_freq$")
PROGRESS_MIN_BYTES = 256 * 2**20


def to_torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, canonical_dtype(dtype))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9, '500MiB' -> 500*2**20, plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
    if not match:
        raise ConfigError(f"cannot read size {text!r}; write e.g. 500MB, 2GB or 80GiB")
    number, unit, binary = match.groups()
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


# ---- locating a checkpoint ------------------------------------------------------------------------
def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a Hugging Face model name downloaded with huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path  # a llama.cpp file: load_model reads it through qwenlab.quant.gguf
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json in this directory; is it a Hugging Face checkpoint?")
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    name = str(model)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        return _download(name)
    raise CheckpointError(f"{path}: checkpoint directory not found")


def _download(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency
        raise CheckpointError(f"{name}: not a local directory, and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as exc:  # offline, unknown repo, gated: one clear line either way
        raise CheckpointError(f"{name}: not a local directory and could not be downloaded from the Hugging Face "
                              f"Hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                              "Offline? Pass the path of a downloaded checkpoint directory instead.") from None


# ---- safetensors headers -----------------------------------------------------------------------------
@dataclass
class TensorEntry:
    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate a safetensors header; errors name the file and the tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header claims {header_len} "
                                      f"bytes, file has {size})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    entries, data_start = {}, 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r}: unsupported or malformed header entry {info!r}") from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r}: {end - begin} bytes stored for shape {list(shape)} "
                                  f"{info['dtype']} ({expected} expected)")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                                  f"file has {size} bytes")
        entries[name] = TensorEntry(path, name, dtype, shape, data_start + begin, expected)
    return entries


def checkpoint_tensors(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint, from the index when sharded."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from None
        entries: dict[str, TensorEntry] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                missing = [n for n, s in weight_map.items() if s == shard]
                raise CheckpointError(f"{directory / shard}: shard named in {INDEX_FILE} is missing "
                                      f"(holds {len(missing)} tensors, e.g. {missing[0]})")
            header = read_safetensors_header(directory / shard)
            for name, file in weight_map.items():
                if file == shard and name not in header:
                    raise CheckpointError(f"{directory / shard}: tensor {name!r} listed in the index is not in this shard")
            entries.update(header)
        return entries
    single = directory / "model.safetensors"
    if single.is_file():
        return read_safetensors_header(single)
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        entries = {}
        for shard in shards:
            entries.update(read_safetensors_header(shard))
        return entries
    if list(directory.glob("pytorch_model*.bin")) or (directory / "model.pt").exists():
        raise CheckpointError(
            f"{directory}: only pickle (.bin) weights found; qwenlab never unpickles checkpoints. Convert them "
            "to safetensors once, where you trust the file: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{directory}').save_pretrained('{directory}')\"")
    raise CheckpointError(f"{directory}: no model.safetensors, {INDEX_FILE} or *.safetensors files")


# ---- mapping checkpoint tensors onto parameters ----------------------------------------------------------
def _targets(model: QwenForCausalLM) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the parameter slice it fills (per-expert names for stacked experts)."""
    targets: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            prefix, inter = name[: -len(".gate_up_proj")], param.shape[1] // 2
            for e in range(param.shape[0]):
                targets[f"{prefix}.{e}.gate_proj.weight"] = param[e, :inter]
                targets[f"{prefix}.{e}.up_proj.weight"] = param[e, inter:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(param.shape[0]):
                targets[f"{prefix}.{e}.down_proj.weight"] = param[e]
        else:
            targets[name] = param
    if model.config.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    return targets


def _fused_expert_targets(model: QwenForCausalLM) -> dict[str, torch.Tensor]:
    """transformers-5 style fused expert tensors, accepted on load as well."""
    return {name: p for name, p in model.named_parameters() if name.endswith(("experts.gate_up_proj", "experts.down_proj"))}


def _read_into(entry: TensorEntry, target: torch.Tensor, handle) -> None:
    handle.seek(entry.offset)
    if entry.dtype == target.dtype and target.device.type == "cpu" and target.is_contiguous():
        buffer = target.reshape(-1).view(torch.uint8).numpy()
    else:
        staging = torch.empty(entry.shape, dtype=entry.dtype)
        buffer = staging.reshape(-1).view(torch.uint8).numpy()
    got = handle.readinto(memoryview(buffer))
    if got != entry.nbytes:
        raise CheckpointError(f"{entry.file}: truncated while reading tensor {entry.name!r}")
    if not (entry.dtype == target.dtype and target.device.type == "cpu" and target.is_contiguous()):
        target.copy_(staging.view(target.shape))


def load_state_into(model: QwenForCausalLM, directory: Path, progress: bool | None = None) -> None:
    entries = checkpoint_tensors(directory)
    targets = _targets(model)
    fused = _fused_expert_targets(model)
    plan: list[tuple[TensorEntry, torch.Tensor]] = []
    for name, entry in entries.items():
        target = targets.pop(name, None)
        if target is None and name in fused:
            target = fused[name]
            parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
            prefix = name.rsplit(".", 1)[0]
            for e in range(target.shape[0]):
                for part in parts:
                    targets.pop(f"{prefix}.{e}.{part}.weight", None)
        if target is None:
            if name == "lm_head.weight" and model.config.tie_word_embeddings or _IGNORED_RE.search(name):
                continue  # a stray head in a tied checkpoint, or an old rotary buffer
            raise CheckpointError(f"{entry.file}: unexpected tensor {name!r} (not part of a "
                                  f"{model.config.model_type} model with this config.json)")
        if tuple(target.shape) != entry.shape:
            raise CheckpointError(f"{entry.file}: tensor {name!r} has shape {list(entry.shape)}, "
                                  f"the config implies {list(target.shape)}")
        plan.append((entry, target))
    if targets:
        missing = sorted(targets)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: missing tensor {missing[0]!r}{more}")
    _execute(plan, progress)


def _execute(plan: list[tuple[TensorEntry, torch.Tensor]], progress: bool | None) -> None:
    from tqdm import tqdm

    total = sum(entry.nbytes for entry, _ in plan)
    show = total >= PROGRESS_MIN_BYTES if progress is None else progress
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show, file=sys.stderr)
    plan.sort(key=lambda item: (str(item[0].file), item[0].offset))  # sequential reads per file
    handles: dict[Path, object] = {}
    try:
        with torch.no_grad():
            for entry, target in plan:
                handle = handles.get(entry.file) or handles.setdefault(entry.file, open(entry.file, "rb"))
                _read_into(entry, target, handle)
                bar.update(entry.nbytes)
    finally:
        for handle in handles.values():
            handle.close()
        bar.close()


def load_model(path: str | os.PathLike, dtype: str | torch.dtype | None = torch.bfloat16,
               device: str | torch.device = "cpu", progress: bool | None = None,
               quantization: str | None = None, group_size: int | None = None) -> QwenForCausalLM:
    """Load a Hugging Face checkpoint directory (qwen2, qwen3, qwen3_moe, qwen2_moe) into QwenForCausalLM.

    ``dtype=None`` keeps the checkpoint's ``torch_dtype``. Also reads qwenlab's quantized checkpoints and
    GGUF files; ``quantization="int8"|"int4"`` quantizes the weights after loading (qwenlab.quant).
    """
    if str(path).endswith(".gguf"):
        from .quant.gguf import load_gguf

        model = load_gguf(path, dtype=dtype, device=device)
    else:
        directory = resolve_model_dir(path)
        config = ModelConfig.from_json_file(directory / "config.json")
        dtype = to_torch_dtype(dtype) or getattr(torch, config.torch_dtype)
        if "quantization_config" in config.extra:
            from .quant.checkpoint import load_quantized

            model = load_quantized(directory, config, dtype, device, progress)
        else:
            model = build_empty(config, dtype, device)
            load_state_into(model, directory, progress)
    if quantization:
        from .quant import quantize_model

        if getattr(model, "quantization", None) is not None:
            raise CheckpointError(f"{path}: already quantized ({model.quantization['method']}); "
                                  f"drop quantization={quantization!r}")
        quantize_model(model, quantization, group_size)
    return model.eval()


def build_empty(config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> QwenForCausalLM:
    """Parameters allocated (uninitialised) on ``device`` in ``dtype``, with no init cost."""
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    return model


# ---- saving -----------------------------------------------------------------------------------------------
def hf_state_items(model: QwenForCausalLM):
    """(HF tensor name, tensor) in official naming: per-expert tensors, tied head omitted."""
    for name, param in model.state_dict(keep_vars=False).items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name.endswith("experts.gate_up_proj"):
            prefix, inter = name[: -len(".gate_up_proj")], param.shape[1] // 2
            for e in range(param.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", param[e, :inter]
                yield f"{prefix}.{e}.up_proj.weight", param[e, inter:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(param.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", param[e]
        else:
            yield name, param


def save_model(model: QwenForCausalLM, directory: str | os.PathLike, max_shard_size: str | int = "5GB",
               dtype: str | torch.dtype | None = None, generation_config: dict | None = None) -> Path:
    """Write config.json, generation_config.json and safetensors (sharded with an index above the limit)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = to_torch_dtype(dtype)
    limit = parse_size(max_shard_size)
    items = list(hf_state_items(model))
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in items:
        nbytes = tensor.numel() * (dtype or tensor.dtype).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    for old in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        old.unlink(missing_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous().clone() for name, t in shard}
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = filename
            total += t.numel() * t.element_size()
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = model.config
    if dtype is not None:
        config = config.replace(torch_dtype=str(dtype).replace("torch.", ""))
    config.save(directory)
    gen = generation_config if generation_config is not None else default_generation_config(config)
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return directory


def default_generation_config(config: ModelConfig) -> dict:
    """The official generation defaults of the family (qwen-architecture.md §6.3)."""
    eos = [151645, 151643] if config.eos_token_id == 151645 else config.eos_token_id
    base = {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": 151643, "do_sample": True}
    if config.model_type in ("qwen3", "qwen3_moe"):
        base.update(temperature=0.6, top_k=20, top_p=0.95)
    else:
        base.update(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    return base


def init_checkpoint(config: ModelConfig, out: str | os.PathLike, seed: int = 0, dtype: str | torch.dtype = "bfloat16",
                    max_shard_size: str | int = "2GB") -> Path:
    """A random-initialised checkpoint (transformers' init scheme) written in HF layout."""
    model = build_empty(config, torch.float32)
    model.init_weights(seed)
    dtype = to_torch_dtype(dtype)
    return save_model(model, out, max_shard_size=max_shard_size, dtype=dtype)
