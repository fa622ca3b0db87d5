"""ModelConfig: one dataclass for Qwen2/Qwen2.5, Qwen3, Qwen3-MoE and Qwen2-MoE.

Reads Hugging Face ``config.json`` in both spellings (transformers 4: ``rope_theta`` / ``rope_scaling`` /
``torch_dtype``; transformers 5: ``rope_parameters`` / ``dtype``) and writes the official (4.x) spelling,
which every transformers version loads. Presets for every released size are rows of data below.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}

# Class defaults of transformers, used when a config.json omits a key.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32),
    "qwen3": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, head_dim=128),
    "qwen3_moe": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
                      num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    "qwen2_moe": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632),
}

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16', etc.; raises ConfigError for anything else."""
    key = str(name).replace("torch.", "").lower()
    if key not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return DTYPE_NAMES[key]


@dataclass
class ModelConfig:
    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen2 style)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # {"rope_type": "yarn"|"linear"|"dynamic", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen3: bias on q, k, v and o
    qkv_bias: bool = True  # Qwen2 / Qwen2-MoE: bias on q, k, v only
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    # Mixture of experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # Bookkeeping carried through to config.json
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    extra: dict = field(default_factory=dict)  # unknown config.json keys, written back untouched

    def __post_init__(self) -> None:
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.qkv_bias, self.attention_bias = True, False
        self.torch_dtype = canonical_dtype(self.torch_dtype)
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)

    # ---- family switches -------------------------------------------------------------------------
    @property
    def qk_norm(self) -> bool:
        return self.model_type in ("qwen3", "qwen3_moe")

    @property
    def has_qkv_bias(self) -> bool:
        return self.attention_bias if self.qk_norm else self.qkv_bias

    @property
    def has_o_bias(self) -> bool:
        return self.attention_bias if self.qk_norm else False

    @property
    def is_moe(self) -> bool:
        return self.model_type in ("qwen3_moe", "qwen2_moe") and self.num_experts > 0

    @property
    def has_shared_expert(self) -> bool:
        return self.model_type == "qwen2_moe" and self.shared_expert_intermediate_size > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.is_moe and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    # ---- validation ------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {self.model_type!r}; qwenlab supports {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (Qwen uses 'silu')")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling type {self.rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}")
        if self.rope_type != "default" and not (self.rope_scaling.get("factor") or 0) > 0:
            raise ConfigError(f"rope_scaling {self.rope_type!r} needs a positive 'factor'")
        needs_dense = any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        if needs_dense and not (isinstance(self.intermediate_size, int) and self.intermediate_size > 0):
            raise ConfigError(f"intermediate_size must be a positive integer, got {self.intermediate_size!r}")
        if self.model_type in ("qwen3_moe", "qwen2_moe") and self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                                  f"num_experts ({self.num_experts})")
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
            if self.decoder_sparse_step <= 0:
                raise ConfigError(f"decoder_sparse_step must be positive, got {self.decoder_sparse_step}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"mlp_only_layers names layers {bad} outside 0..{self.num_hidden_layers - 1}")
        return self

    # ---- HF config.json in and out -----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        model_type = data.pop("model_type", None)
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {model_type!r}; qwenlab supports {', '.join(MODEL_TYPES)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "model_type"}
        values: dict[str, Any] = dict(_FAMILY_DEFAULTS[model_type])
        if model_type == "qwen2_moe":
            values["qkv_bias"] = True
        rope_parameters = data.pop("rope_parameters", None)
        theta, scaling = _read_rope(rope_parameters, data.pop("rope_theta", None), data.pop("rope_scaling", None))
        values["rope_theta"] = theta
        values["rope_scaling"] = scaling
        if "num_local_experts" in data:  # transformers 5 spelling of num_experts for qwen3_moe
            data["num_experts"] = data.pop("num_local_experts")
        dtype = data.pop("dtype", None) or data.pop("torch_dtype", None)
        data.pop("torch_dtype", None)
        if dtype is not None:
            values["torch_dtype"] = dtype
        extra = {}
        for key, value in data.items():
            if key in known:
                values[key] = value
            else:
                extra[key] = value
        for key in ("architectures", "transformers_version", "layer_types"):
            extra.pop(key, None)  # regenerated on write
        if not extra.get("output_router_logits", True):
            extra.pop("output_router_logits")
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values.get("num_attention_heads")
        if values.get("max_window_layers") == values.get("num_hidden_layers"):
            values["max_window_layers"] = None  # the default; kept implicit so layer-count overrides follow it
        if values.get("mlp_only_layers") is None:
            values["mlp_only_layers"] = []
        return cls(model_type=model_type, extra=extra, **values).validate()

    def to_hf_dict(self) -> dict:
        out: dict[str, Any] = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type}
        skip = {"extra", "model_type", "qkv_bias", "attention_bias", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = getattr(self, f.name)
        if self.qk_norm:
            out["attention_bias"] = self.attention_bias
        if self.model_type == "qwen2_moe":
            out["qkv_bias"] = self.qkv_bias
        if self.model_type in ("qwen3_moe", "qwen2_moe"):
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                         "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"):
                out[name] = getattr(self, name)
            out["output_router_logits"] = self.extra.get("output_router_logits", False)
        if self.model_type == "qwen2_moe":
            out["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        if out["max_window_layers"] is None:
            out["max_window_layers"] = self.num_hidden_layers
        if self.model_type in ("qwen2", "qwen2_moe") and self.head_dim != self.hidden_size // self.num_attention_heads:
            raise ConfigError(f"{self.model_type} derives head_dim from hidden_size/num_attention_heads; "
                              f"head_dim={self.head_dim} cannot be expressed in its config.json")
        if self.model_type in ("qwen2", "qwen2_moe"):
            out.pop("head_dim")
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_hf_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with fields overridden (unknown names raise ConfigError), validated."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        data = dataclasses.asdict(self)
        data.update(overrides)
        if "num_attention_heads" in overrides or "hidden_size" in overrides:
            if "head_dim" not in overrides and not self.qk_norm:
                data["head_dim"] = None
        return ModelConfig(**data).validate()

    # ---- sizes -----------------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameter counts from the shapes alone: total, active per token, embedding, non-embedding."""
        H, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = H * q + 2 * H * kv + q * H
        if self.has_qkv_bias:
            attn += q + 2 * kv
        if self.has_o_bias:
            attn += H
        if self.qk_norm:
            attn += 2 * hd
        norms = 2 * H
        total = active = 0
        for layer in range(self.num_hidden_layers):
            if self.is_moe_layer(layer):
                expert = 3 * H * self.moe_intermediate_size
                mlp_total = self.num_experts * expert + self.num_experts * H
                mlp_active = self.num_experts_per_tok * expert + self.num_experts * H
                if self.has_shared_expert:
                    shared = 3 * H * self.shared_expert_intermediate_size + H
                    mlp_total += shared
                    mlp_active += shared
            else:
                mlp_total = mlp_active = 3 * H * self.intermediate_size
            total += attn + norms + mlp_total
            active += attn + norms + mlp_active
        embedding = self.vocab_size * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        extra = embedding + head + H
        return {"total": total + extra, "active": active + extra, "embedding": embedding + head,
                "non_embedding": total + H}


def _normalise_rope_scaling(scaling: dict) -> dict | None:
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object, got {scaling!r}")
    scaling = dict(scaling)
    legacy = scaling.pop("type", None)
    scaling.setdefault("rope_type", legacy or "default")
    scaling.pop("rope_theta", None)
    if scaling["rope_type"] == "default":
        return None
    return scaling


def _read_rope(rope_parameters: Any, rope_theta: Any, rope_scaling: Any) -> tuple[float, dict | None]:
    if isinstance(rope_parameters, dict) and rope_parameters:
        params = rope_parameters
        if all(isinstance(v, dict) for v in params.values()):  # per layer-type form
            params = params.get("full_attention") or next(iter(params.values()))
        theta = params.get("rope_theta", rope_theta if rope_theta is not None else 10000.0)
        return float(theta), _normalise_rope_scaling(params)
    theta = float(rope_theta) if rope_theta is not None else 10000.0
    return theta, (_normalise_rope_scaling(rope_scaling) if rope_scaling else None)


# ---------------------------------------------------------------------------------------------------
# Presets: every official size (qwen-architecture.md §5). Columns: L, H, I, nh, nkv, hd, vocab, tie,
# max_pos, and for MoE: E, k, moe_I, shared_I, norm_topk_prob.
_QWEN25 = {
    "0.5b": (24, 896, 4864, 14, 2, 64, 151936, True),
    "1.5b": (28, 1536, 8960, 12, 2, 128, 151936, True),
    "3b": (36, 2048, 11008, 16, 2, 128, 151936, True),
    "7b": (28, 3584, 18944, 28, 4, 128, 152064, False),
    "14b": (48, 5120, 13824, 40, 8, 128, 152064, False),
    "32b": (64, 5120, 27648, 40, 8, 128, 152064, False),
    "72b": (80, 8192, 29568, 64, 8, 128, 152064, False),
}
_QWEN3 = {
    "0.6b": (28, 1024, 3072, 16, 8, 151936, True),
    "1.7b": (28, 2048, 6144, 16, 8, 151936, True),
    "4b": (36, 2560, 9728, 32, 8, 151936, True),
    "8b": (36, 4096, 12288, 32, 8, 151936, False),
    "14b": (40, 5120, 17408, 40, 8, 151936, False),
    "32b": (64, 5120, 25600, 64, 8, 151936, False),
}


def _build_presets() -> dict[str, dict]:
    presets: dict[str, dict] = {}
    for size, (L, H, I, nh, nkv, _hd, V, tie) in _QWEN25.items():
        presets[f"qwen2.5-{size}"] = dict(
            model_type="qwen2", num_hidden_layers=L, hidden_size=H, intermediate_size=I, num_attention_heads=nh,
            num_key_value_heads=nkv, vocab_size=V, tie_word_embeddings=tie, max_position_embeddings=32768,
            eos_token_id=151645)
    for size, (L, H, I, nh, nkv, V, tie) in _QWEN3.items():
        presets[f"qwen3-{size}"] = dict(
            model_type="qwen3", num_hidden_layers=L, hidden_size=H, intermediate_size=I, num_attention_heads=nh,
            num_key_value_heads=nkv, head_dim=128, vocab_size=V, tie_word_embeddings=tie,
            max_position_embeddings=40960, eos_token_id=151645)
    for name, (L, H, I, nh, nkv, moe_I) in {"qwen3-30b-a3b": (48, 2048, 6144, 32, 4, 768),
                                             "qwen3-235b-a22b": (94, 4096, 12288, 64, 4, 1536)}.items():
        presets[name] = dict(
            model_type="qwen3_moe", num_hidden_layers=L, hidden_size=H, intermediate_size=I, num_attention_heads=nh,
            num_key_value_heads=nkv, head_dim=128, num_experts=128, num_experts_per_tok=8,
            moe_intermediate_size=moe_I, norm_topk_prob=True, vocab_size=151936, tie_word_embeddings=False,
            max_position_embeddings=40960, eos_token_id=151645)
    for name, (L, H, I, nh, nkv, E, k, moe_I, shared_I, max_pos) in {
            "qwen1.5-moe-a2.7b": (24, 2048, 5632, 16, 16, 60, 4, 1408, 5632, 8192),
            "qwen2-57b-a14b": (28, 3584, 18944, 28, 4, 64, 8, 2560, 20480, 131072)}.items():
        presets[name] = dict(
            model_type="qwen2_moe", num_hidden_layers=L, hidden_size=H, intermediate_size=I, num_attention_heads=nh,
            num_key_value_heads=nkv, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=moe_I,
            shared_expert_intermediate_size=shared_I, norm_topk_prob=False, vocab_size=151936,
            tie_word_embeddings=False, max_position_embeddings=max_pos, eos_token_id=151643)
    return presets


PRESETS = _build_presets()


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of an official size, e.g. ``preset("qwen3-0.6b", num_hidden_layers=2)``."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    config = ModelConfig(**PRESETS[key]).validate()
    return config.replace(**overrides) if overrides else config


def parse_override(text: str) -> tuple[str, Any]:
    """'num_hidden_layers=2' -> ('num_hidden_layers', 2); values are JSON where they parse, else strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value
