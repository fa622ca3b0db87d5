"""Deployment arithmetic: parameters, weight and KV-cache bytes, GQA saving, FLOPs, fit in memory."""

from __future__ import annotations

from .checkpoint import parse_size, to_torch_dtype
from .config import ModelConfig


def make_plan(config: ModelConfig, context: int | None = None, batch: int = 1, dtype: str = "bfloat16",
              kv_dtype: str | None = None, memory: str | int | None = None, name: str = "") -> dict:
    context = context or config.max_position_embeddings
    if context <= 0 or batch <= 0:
        from .errors import ConfigError

        raise ConfigError(f"context and batch must be positive (got context={context}, batch={batch})")
    weight_bytes_per_param = to_torch_dtype(dtype).itemsize
    kv_bytes_per_value = to_torch_dtype(kv_dtype or dtype).itemsize
    counts = config.param_counts()
    L, nh, nkv, hd = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    kv_per_token = 2 * L * nkv * hd * kv_bytes_per_value
    mha_per_token = 2 * L * nh * hd * kv_bytes_per_value
    # Forward FLOPs of one token: 2 per active weight, plus QK^T and PV over the context it attends to.
    attn_flops_at_context = 4 * L * nh * hd * context
    plan = {
        "model": name or config.model_type,
        "model_type": config.model_type,
        "dtype": str(to_torch_dtype(dtype)).replace("torch.", ""),
        "kv_dtype": str(to_torch_dtype(kv_dtype or dtype)).replace("torch.", ""),
        "context": context,
        "batch": batch,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "params_embedding": counts["embedding"],
        "weight_bytes": counts["total"] * weight_bytes_per_param,
        "active_weight_bytes_per_token": counts["active"] * weight_bytes_per_param,
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes_total": kv_per_token * context * batch,
        "mha_kv_bytes_per_token": mha_per_token,
        "gqa_saving": mha_per_token / kv_per_token,
        "flops_per_token_forward": 2 * counts["active"] + attn_flops_at_context,
        "flops_per_token_training": 3 * (2 * counts["active"] + attn_flops_at_context),
    }
    if memory is not None:
        available = parse_size(memory)
        need = plan["weight_bytes"] + plan["kv_bytes_total"]
        left = available - plan["weight_bytes"]
        plan.update(memory_bytes=available, memory_needed=need, fits=need <= available,
                    max_batch_at_context=max(0, left // (kv_per_token * context)),
                    max_tokens_in_kv=max(0, left // kv_per_token))
    return plan


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_plan(plan: dict) -> str:
    rows = [
        ("model", f"{plan['model']} ({plan['model_type']})"),
        ("parameters", f"{plan['params_total'] / 1e9:.3f}B total, {plan['params_active'] / 1e9:.3f}B active per token"),
        ("weights", f"{_bytes(plan['weight_bytes'])} in {plan['dtype']}"),
        ("weights read per token", _bytes(plan["active_weight_bytes_per_token"])),
        ("KV cache per token", f"{_bytes(plan['kv_bytes_per_token'])} in {plan['kv_dtype']}"),
        (f"KV cache at {plan['context']} tokens x {plan['batch']}", _bytes(plan["kv_bytes_total"])),
        ("full multi-head attention would need", f"{_bytes(plan['mha_kv_bytes_per_token'])} per token "
                                                 f"(GQA saves {plan['gqa_saving']:.1f}x)"),
        ("forward FLOPs per token", f"{plan['flops_per_token_forward'] / 1e9:.2f} GFLOP at {plan['context']} context"),
        ("training FLOPs per token", f"{plan['flops_per_token_training'] / 1e9:.2f} GFLOP"),
    ]
    if "fits" in plan:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        rows += [("memory", f"{_bytes(plan['memory_needed'])} needed of {_bytes(plan['memory_bytes'])}: {verdict}"),
                 ("max sequences at this context", str(plan["max_batch_at_context"])),
                 ("max tokens in KV cache", str(plan["max_tokens_in_kv"]))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
