"""QwenForCausalLM: one decoder for Qwen2/2.5, Qwen3, Qwen3-MoE and Qwen2-MoE, switched by config.

``model(input_ids)`` with [B, S] ids is a plain causal forward at positions 0..S-1 returning logits
[B, S, V]. The same forward takes explicit ``positions`` and an attention ``context`` for flattened
variable-length batches: ``PackedAttention(cu_seqlens)`` for packed training rows, or the engine's
paged-KV context, which receives every layer's q/k/v through ``context.attend(layer_idx, q, k, v, scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import RequestError
from . import fused
from .fused import linear_cross_entropy_sum
from .layers import MLP, Attention, CausalAttention, RMSNorm, RotaryEmbedding
from .moe import Experts, SparseMoE, load_balancing_loss


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None
    hidden_states: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] = ()
    aux_loss: torch.Tensor | None = None
    ce_sum: torch.Tensor | None = None  # summed token cross-entropy (float32), when loss_targets were given


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size,
                                                                                 config.intermediate_size)

    def forward(self, h, cos, sin, context) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, context)
        out = self.mlp(self.post_attention_layernorm(h))
        router_logits = None
        if isinstance(out, tuple):
            out, router_logits = out
        return h + out, router_logits


class QwenModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


class QwenForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.model = QwenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, context=None,
                logits_indices: torch.Tensor | None = None, output_router_logits: bool = False,
                loss_targets: torch.Tensor | None = None):
        """Logits [B, S, V] (or [len(logits_indices), V] for the selected flattened tokens).

        With ``output_router_logits`` a ``ForwardOutput`` is returned, carrying the router logits of every
        MoE layer and transformers' load-balancing loss as ``aux_loss``. With ``loss_targets`` (one target
        per selected token) a ``ForwardOutput`` is returned with the summed cross-entropy as ``ce_sum``
        and no logits: the LM head and the loss run fused (training).
        """
        hidden, router_logits = self.forward_hidden(input_ids, positions, context, output_router_logits)
        if logits_indices is not None:
            # index_select: its backward is an index_add (indexing's is a slower accumulating index_put)
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logits_indices)
        if loss_targets is not None:
            return self._forward_loss(hidden, loss_targets, router_logits, output_router_logits)
        logits = self.lm_head(hidden)
        if not output_router_logits:
            return logits
        aux = None
        if router_logits:
            aux = load_balancing_loss(router_logits, self.config.num_experts, self.config.num_experts_per_tok)
        return ForwardOutput(logits=logits, router_logits=router_logits, aux_loss=aux)

    def _forward_loss(self, hidden, targets, router_logits, output_router_logits) -> ForwardOutput:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        head = self.lm_head
        if type(head) is nn.Linear and head.bias is None:  # not a LoRA-wrapped head
            ce = linear_cross_entropy_sum(hidden, head.weight, targets)
        else:
            ce = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        return ForwardOutput(logits=None, router_logits=router_logits if output_router_logits else (), ce_sum=ce)

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, context=None,
                       output_router_logits: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Final-norm hidden states [B, S, H] (before the LM head) and router logits if asked."""
        input_ids = self._check_ids(input_ids)
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = fused.embedding(input_ids, self.model.embed_tokens)
        cos, sin = self.model.rotary(positions, h.dtype)
        context = context if context is not None else CausalAttention()
        router_logits = []
        for layer in self.model.layers:
            h, logits = layer(h, cos, sin, context)
            if output_router_logits and logits is not None:
                router_logits.append(logits)
        return self.model.norm(h), tuple(router_logits)

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise RequestError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise RequestError(f"input_ids must have shape [batch, seq] or [tokens], got {tuple(input_ids.shape)}")
        if input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise RequestError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return input_ids

    # ---- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """transformers' init: N(0, initializer_range) for matrices and embeddings, zero biases, unit norms."""
        generator = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                _normal_(module.weight, std, generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Experts):
                _normal_(module.gate_up_proj, std, generator)
                _normal_(module.down_proj, std, generator)
        self.tie_weights()


def _normal_(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(std))
