"""ModelConfig: presets against the model cards, both config.json spellings, validation."""

from __future__ import annotations

import json

import pytest

from qwenlab.config import PRESETS, ModelConfig, parse_override, preset
from qwenlab.errors import ConfigError

# Model-card / reference parameter counts (qwen-architecture.md §5).
CARDS = {
    "qwen2.5-0.5b": (0.494e9, None),
    "qwen3-0.6b": (0.596e9, None),
    "qwen2.5-7b": (7.616e9, None),
    "qwen3-30b-a3b": (30.532e9, 3.353e9),
    "qwen3-235b-a22b": (235.09e9, 22.19e9),
}


@pytest.mark.parametrize("name", list(CARDS))
def test_parameter_counts_match_model_cards(name):
    total, active = CARDS[name]
    counts = preset(name).param_counts()
    assert round(counts["total"] / 1e9, 3 if total < 100e9 else 2) == round(total / 1e9, 3 if total < 100e9 else 2)
    if active:
        assert round(counts["active"] / 1e9, 3 if active < 10e9 else 2) == round(active / 1e9, 3 if active < 10e9 else 2)
    else:
        assert counts["active"] == counts["total"]


def test_qwen3_30b_exact_and_every_preset_valid():
    assert preset("qwen3-30b-a3b").param_counts()["total"] == 30_532_122_624  # Keras preset, exact
    assert len(PRESETS) == 17
    for name in PRESETS:
        config = preset(name)
        assert config.param_counts()["total"] > 0
        ModelConfig.from_hf_dict(config.to_hf_dict())  # every preset survives its own config.json


def test_qwen3_head_dim_independent_of_hidden():
    config = preset("qwen3-0.6b")
    assert config.head_dim == 128 and config.hidden_size // config.num_attention_heads == 64
    assert preset("qwen2.5-0.5b").head_dim == 64


def test_transformers4_and_5_spellings_read_the_same():
    v4 = {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 32, "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 300,
          "rope_theta": 1000000, "torch_dtype": "bfloat16",
          "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "torch_dtype", "rope_scaling")}
    v5["dtype"] = "bfloat16"
    v5["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                             "original_max_position_embeddings": 32768}
    a, b = ModelConfig.from_hf_dict(v4), ModelConfig.from_hf_dict(v5)
    assert a == b
    assert a.rope_theta == 1e6 and a.rope_type == "yarn" and a.rope_scaling["factor"] == 4.0
    written = a.to_hf_dict()
    assert written["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert written["torch_dtype"] == "bfloat16" and written["architectures"] == ["Qwen3ForCausalLM"]
    # rope_scaling with rope_type "default" means no scaling
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert ModelConfig.from_hf_dict(v5).rope_scaling is None


def test_written_config_loads_in_transformers(tmp_path):
    import transformers

    for name in ("qwen2.5-0.5b", "qwen3-8b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b"):
        config = preset(name, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 32768})
        directory = tmp_path / name
        directory.mkdir()
        config.save(directory)
        hf = transformers.AutoConfig.from_pretrained(directory)
        assert hf.model_type == config.model_type
        assert hf.num_hidden_layers == config.num_hidden_layers
        assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["rope_theta"] == 1e6
        assert getattr(hf, "num_experts", 0) == config.num_experts
        assert ModelConfig.from_json_file(directory / "config.json") == config


@pytest.mark.parametrize("overrides,message", [
    (dict(num_key_value_heads=3), "not divisible by num_key_value_heads"),
    (dict(head_dim=31), "head_dim must be even"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2}), "not supported"),
    (dict(rope_scaling={"rope_type": "yarn"}), "needs a positive 'factor'"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
])
def test_inconsistent_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preset("qwen3-0.6b", **overrides)


def test_moe_validation_and_unknown_things():
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        preset("qwen3-30b-a3b", num_experts_per_tok=200)
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        preset("qwen3-30b-a3b", mlp_only_layers=[99])
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("qwen9-1b")
    with pytest.raises(ConfigError, match="unknown config field"):
        preset("qwen3-0.6b", num_layers=2)
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        ModelConfig.from_hf_dict({"model_type": "llama"})


def test_layer_pattern_and_overrides():
    config = preset("qwen3-30b-a3b", num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[5])
    assert [config.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, False]
    assert parse_override("num_hidden_layers=2") == ("num_hidden_layers", 2)
    assert parse_override("rope_scaling={\"rope_type\": \"linear\", \"factor\": 2}")[1]["factor"] == 2
    assert parse_override("torch_dtype=bfloat16") == ("torch_dtype", "bfloat16")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("oops")


def test_from_json_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "num_attention_heads": 5,
                                                       "num_key_value_heads": 2}))
    with pytest.raises(ConfigError, match="config.json: num_attention_heads \\(5\\) is not divisible"):
        ModelConfig.from_json_file(tmp_path / "config.json")
