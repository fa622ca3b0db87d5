"""llama.cpp's GGUF files in (and out, for tests and benchmarks), through the PyPI ``gguf`` package.

``load_gguf(path)`` (what ``qwenlab.load_model("model.gguf")`` calls) reads a Qwen2/2.5 (``qwen2``), Qwen3
(``qwen3``), Qwen3-MoE (``qwen3moe``) or Qwen2-MoE (``qwen2moe``) file: the metadata becomes a ModelConfig,
llama.cpp tensor names map to ours (``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight``,
``ffn_{gate,up,down}_exps`` -> the stacked experts, ...) and every tensor is dequantized with ``gguf``'s
reference code into the requested dtype. Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; anything else (IQ*, TQ*, MXFP4, ...) is refused naming the type and
the tensor. Qwen models use NeoX-style RoPE, so no Q/K permutation is undone. To run 8- or 4-bit after
loading, pass ``quantization=`` to ``load_model`` (the weights are re-quantized in our formats).

The tokenizer is not read from the file: put tokenizer.json next to it or pass token ids.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

ARCHES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
# ours <- llama.cpp, per layer
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    # ffn_gate_exps / ffn_up_exps are concatenated into mlp.experts.gate_up_proj
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - a dependency
        raise CheckpointError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # bad magic, truncated, malformed
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception:  # pragma: no cover - old gguf versions
        return default


def gguf_config(reader, path: Path):
    """A ModelConfig from the file's metadata (plus the tensors' shapes where metadata is silent)."""
    from ..config import ModelConfig

    arch = _field(reader, "general.architecture")
    if arch not in ARCHES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported "
                              f"(qwenlab reads {', '.join(ARCHES)})")
    shapes = {t.name: [int(d) for d in reversed(t.shape)] for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    vocab, hidden = shapes["token_embd.weight"]
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = get("attention.head_count")
    data = {
        "model_type": ARCHES[arch], "vocab_size": vocab, "hidden_size": get("embedding_length", hidden),
        "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "intermediate_size": get("feed_forward_length", 0) or 0,
        "max_position_embeddings": get("context_length", 32768),
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon', 1e-6):.7g}"),  # stored as float32
        "rope_theta": get("rope.freq_base", 1_000_000.0),
        "tie_word_embeddings": "output.weight" not in shapes,
        "torch_dtype": "bfloat16",
    }
    if get("attention.key_length"):
        data["head_dim"] = get("attention.key_length")
    if ARCHES[arch] == "qwen3" or ARCHES[arch] == "qwen3_moe":
        data["attention_bias"] = "blk.0.attn_output.bias" in shapes
    if get("expert_count"):
        data.update(num_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
                    moe_intermediate_size=get("expert_feed_forward_length") or shapes["blk.0.ffn_down_exps.weight"][2],
                    # llama.cpp renormalises the top-k weights for qwen3moe, not for qwen2moe
                    norm_topk_prob=bool(get("expert_weights_norm", ARCHES[arch] == "qwen3_moe")))
        if "blk.0.ffn_down_shexp.weight" in shapes:
            data["shared_expert_intermediate_size"] = (get("expert_shared_feed_forward_length")
                                                       or shapes["blk.0.ffn_down_shexp.weight"][1])
    scaling = get("rope.scaling.type")
    if scaling and scaling != "none":
        data["rope_scaling"] = {"rope_type": scaling, "factor": get("rope.scaling.factor", 1.0)}
        if get("rope.scaling.original_context_length"):
            data["rope_scaling"]["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
    for key, token in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        value = _field(reader, token)
        if value is not None:
            data[key] = int(value)
    if any(v is None for v in (data["num_hidden_layers"], heads)):
        raise CheckpointError(f"{path}: metadata lacks {arch}.block_count or {arch}.attention.head_count")
    try:
        return ModelConfig.from_hf_dict(data)
    except Exception as exc:
        raise CheckpointError(f"{path}: GGUF metadata does not make a valid {ARCHES[arch]} config ({exc})") from None


def _dequantize(tensor, path: Path) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType(tensor.tensor_type).name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} has GGUF type {kind}, which qwenlab does not read "
                              f"(supported: {', '.join(SUPPORTED_TYPES)})")
    shape = [int(d) for d in reversed(tensor.shape)]
    try:
        if kind in ("F32", "F16"):
            array = np.asarray(tensor.data)
        else:
            array = quants.dequantize(np.asarray(tensor.data), GGMLQuantizationType[kind])
        return array.reshape(shape)
    except Exception as exc:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} ({kind}, shape {shape}) cannot be decoded "
                              f"({type(exc).__name__}: {exc})") from None


def our_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def load_gguf(path: str | os.PathLike, dtype=torch.bfloat16, device="cpu"):
    """A QwenForCausalLM with the GGUF file's weights (dequantized into ``dtype``)."""
    from ..checkpoint import build_empty, to_torch_dtype

    path = Path(path)
    reader = _reader(path)
    config = gguf_config(reader, path)
    model = build_empty(config, to_torch_dtype(dtype) or torch.bfloat16, device)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    pending_experts: dict[str, dict[str, np.ndarray]] = {}
    with torch.no_grad():
        for tensor in reader.tensors:
            layer = _LAYER_RE.match(tensor.name)
            if layer and layer.group(2) in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
                part = pending_experts.setdefault(layer.group(1), {})
                part["gate" if "gate" in layer.group(2) else "up"] = _dequantize(tensor, path)
                if len(part) == 2:
                    name = f"model.layers.{layer.group(1)}.mlp.experts.gate_up_proj"
                    _assign(params, name, np.concatenate([part["gate"], part["up"]], axis=1), path,
                            tensor.name)
                    filled.add(name)
                continue
            name = our_name(tensor.name)
            if name is None:
                if tensor.name.startswith("rope_") or tensor.name.endswith("rope_freqs.weight"):
                    continue
                raise CheckpointError(f"{path}: unexpected tensor {tensor.name!r} for a {config.model_type} model")
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            _assign(params, name, _dequantize(tensor, path), path, tensor.name)
            filled.add(name)
    model.tie_weights()
    missing = sorted(set(params) - filled - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise CheckpointError(f"{path}: missing tensor for {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return model.eval()


def _assign(params: dict, name: str, array: np.ndarray, path: Path, source: str) -> None:
    target = params.get(name)
    if target is None:
        raise CheckpointError(f"{path}: tensor {source!r} maps to {name!r}, which this config does not have")
    value = torch.from_numpy(np.array(array, copy=True, order="C"))
    if tuple(value.shape) != tuple(target.shape):
        if value.numel() != target.numel() or not name.endswith("shared_expert_gate.weight"):
            raise CheckpointError(f"{path}: tensor {source!r} has shape {list(value.shape)}, the metadata implies "
                                  f"{list(target.shape)} for {name}")
        value = value.reshape(target.shape)
    target.copy_(value)


# ---- writing (tests, benchmarks) ---------------------------------------------------------------------------
def save_gguf(model, path: str | os.PathLike, qtype: str = "F32") -> Path:
    """Write a model as a GGUF file with llama.cpp's names and metadata (no tokenizer), tensors in ``qtype``
    (2-D weights; norms and biases stay F32). For tests and benchmarks of the reader."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    config = model.config
    arch = {v: k for k, v in ARCHES.items()}[config.model_type]
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if config.num_experts:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    reverse = {v: k for k, v in _LAYER_NAMES.items()}
    kind = GGMLQuantizationType[qtype]
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.detach().float().cpu().numpy()
        if name.endswith("experts.gate_up_proj"):
            inter = array.shape[1] // 2
            layer = name.split(".")[2]
            items = [(f"blk.{layer}.ffn_gate_exps.weight", array[:, :inter]),
                     (f"blk.{layer}.ffn_up_exps.weight", array[:, inter:])]
        elif name in {v: k for k, v in _GLOBAL_NAMES.items()}:
            items = [({v: k for k, v in _GLOBAL_NAMES.items()}[name], array)]
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            items = [(f"blk.{layer}.{reverse[rest]}", array)]
        for gname, value in items:
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.ndim >= 2 and kind != GGMLQuantizationType.F32 and not gname.endswith("norm.weight"):
                writer.add_tensor(gname, quants.quantize(value, kind), raw_dtype=kind)
            else:
                writer.add_tensor(gname, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
