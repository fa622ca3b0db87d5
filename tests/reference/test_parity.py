"""Logit parity with transformers on random checkpoints of every family, through ``qwenlab.load_model``."""

from __future__ import annotations

import json

import pytest
import torch

import qwenlab
from qwenlab.model.moe import load_balancing_loss
from tests.conftest import hf_checkpoint, hf_model

CASES = {
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3-headdim": ("qwen3", dict(head_dim=32, hidden_size=64, num_attention_heads=4)),  # 32 != 64/4
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),
    "qwen3_moe-norm": ("qwen3_moe", dict(norm_topk_prob=True)),
    "qwen3_moe-nonorm": ("qwen3_moe", dict(norm_topk_prob=False)),
    "qwen3_moe-mixed": ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])),
    "qwen2_moe-shared": ("qwen2_moe", dict()),
}
LONG = 100  # tokens; the scaled-RoPE cases set the original context to 32 or 64 so we evaluate past it
ROPE_CASES = {
    "yarn": dict(max_position_embeddings=128, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 32}),
    "yarn-mscale": dict(max_position_embeddings=128, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "beta_fast": 16,
        "mscale": 1.0, "mscale_all_dim": 0.5}),
    "linear": dict(max_position_embeddings=64, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic": dict(max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    diff = (ours.float() - ref.float()).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= 1e-4 * scale, f"max |logit difference| {diff:.3g} > 1e-4 x {scale:.3g}"


def forward_both(directory, hf, seq: int = 23, batch: int = 2, seed: int = 1):
    ids = torch.randint(0, hf.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ours = qwenlab.load_model(directory, dtype=torch.float32)
    assert isinstance(ours, torch.nn.Module) and isinstance(ours.config, qwenlab.ModelConfig)
    with torch.no_grad():
        return ours(ids), hf(ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_float32_parity(tmp_path, case):
    family, overrides = CASES[case]
    directory, hf = hf_checkpoint(family, tmp_path / case, **overrides)
    ours, ref = forward_both(directory, hf)
    assert_close_logits(ours, ref)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("rope", list(ROPE_CASES))
def test_scaled_rope_past_original_context(tmp_path, family, rope):
    directory, hf = hf_checkpoint(family, tmp_path / f"{family}-{rope}", **ROPE_CASES[rope])
    ours, ref = forward_both(directory, hf, seq=LONG, batch=1)
    assert_close_logits(ours, ref)


def _to_v4_spelling(directory) -> dict:
    """Rewrite a transformers-5 config.json the way official (transformers 4) checkpoints spell it."""
    path = directory / "config.json"
    data = json.loads(path.read_text())
    rope = data.pop("rope_parameters")
    data["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    data["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}  # legacy "type" key
    data["torch_dtype"] = data.pop("dtype", "float32")
    if "num_local_experts" in data:
        data["num_experts"] = data.pop("num_local_experts")
    path.write_text(json.dumps(data))
    return data


@pytest.mark.parametrize("family,rope", [("qwen3", "yarn"), ("qwen2", "linear"), ("qwen3_moe", None),
                                         ("qwen2_moe", None)])
def test_transformers4_config_spelling(tmp_path, family, rope):
    directory, hf = hf_checkpoint(family, tmp_path / family, **(ROPE_CASES[rope] if rope else {}))
    data = _to_v4_spelling(directory)
    assert "rope_parameters" not in data and "rope_theta" in data
    ours, ref = forward_both(directory, hf, seq=LONG if rope else 23, batch=1)
    assert_close_logits(ours, ref)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe", "qwen2_moe"])
def test_bfloat16_same_argmax(tmp_path, family):
    from transformers import AutoModelForCausalLM

    directory, _ = hf_checkpoint(family, tmp_path / family, hidden_size=128, intermediate_size=256)
    # Loaded the way users load it (a bare .to(bfloat16) would also round transformers' RoPE buffer).
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, hf.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(3))
    ours = qwenlab.load_model(directory, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        a, b = ours(ids).argmax(-1), hf(ids).logits.argmax(-1)
    agreement = (a == b).float().mean().item()
    assert agreement >= 0.99, f"argmax agrees on only {agreement:.1%} of positions"


@pytest.mark.parametrize("family,overrides", [("qwen3_moe", dict(norm_topk_prob=True)),
                                              ("qwen3_moe", dict(num_hidden_layers=4, mlp_only_layers=[1])),
                                              ("qwen2_moe", dict())])
def test_load_balancing_loss_matches_transformers(tmp_path, family, overrides):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    directory, hf = hf_checkpoint(family, tmp_path / family, **overrides)
    ids = torch.randint(0, hf.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding on one row
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        out = qwenlab.load_model(directory, dtype=torch.float32)(ids, output_router_logits=True)
    cfg = hf.config
    top_k, experts = cfg.num_experts_per_tok, out.router_logits[0].shape[-1]
    assert len(out.router_logits) == len(ref.router_logits)
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) <= 1e-5
    for router_logits in (ref.router_logits, out.router_logits):
        for m in (None, mask):
            expected = load_balancing_loss_func(router_logits, experts, top_k, m)
            assert abs(load_balancing_loss(router_logits, experts, top_k, m).item() - expected.item()) <= 1e-5
    assert_close_logits(out.logits, ref.logits)


def test_round_trip_qwenlab_transformers_qwenlab(tmp_path):
    """qwenlab writes, transformers loads and re-saves, qwenlab loads again: bit-exact."""
    from tests.conftest import hf_classes, qwenlab_checkpoint

    first = qwenlab_checkpoint(tmp_path / "a", preset="qwen3-30b-a3b", num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=16, mlp_only_layers=[0])
    _, model_cls = hf_classes("qwen3_moe")
    hf = model_cls.from_pretrained(first, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "b")
    a, b = qwenlab.load_model(first, dtype=None), qwenlab.load_model(tmp_path / "b", dtype=None)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    ids = torch.arange(40).view(2, 20) % 384
    with torch.no_grad():
        assert_close_logits(a(ids), hf(ids).logits)


def test_positions_and_flat_input_match_plain_forward(tmp_path):
    """The flattened variable-length path (explicit positions + packed documents) equals separate forwards."""
    from qwenlab.model.layers import PackedAttention

    directory, hf = hf_checkpoint("qwen3", tmp_path / "q")
    model = qwenlab.load_model(directory, dtype=torch.float32)
    docs = [torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11, 3)]
    flat = torch.cat(docs)
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    cu = torch.tensor([0, 5, 16, 19])
    with torch.no_grad():
        packed = model(flat, positions=positions, context=PackedAttention(cu))[0]
        separate = torch.cat([hf(d[None]).logits[0] for d in docs])
        last = model(flat, positions=positions, context=PackedAttention(cu), logits_indices=cu[1:] - 1)
    assert_close_logits(packed, separate)
    assert_close_logits(last, separate[cu[1:] - 1])
