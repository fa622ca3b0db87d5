"""Attention over the paged KV cache: the ``context`` the model calls as ``attend(layer_idx, q, k, v, scale)``.

Each layer first writes the new tokens' keys and values into its cache at ``slot_mapping``, then attends:

* decode rows (one new token) all at once: the CPU kernel reads the blocks in place; otherwise (CUDA,
  or no compiler) the rows' blocks are gathered, padded to the longest, and masked in one SDPA call;
* prefill chunks one sequence at a time: a chunk that starts a sequence attends to its own fresh keys
  (plain causal); a later chunk attends to every cached key of its sequence, causal at the bottom-right
  (query i at position ``ctx - n + i`` sees keys ``<= ctx - n + i``). On CPU the kernels' ``prefill_attention``
  (flash-attention order on the BLAS sgemm, about 2x torch's SDPA at 512 tokens); otherwise SDPA.

Shapes: q [1, num_heads, T, head_dim], k/v [1, num_kv_heads, T, head_dim] (T = all tokens of the step);
cache per layer [num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot of each new token
    query_start: list[int]  # [B + 1] token offsets of each sequence in the step
    context_lens: list[int]  # [B] tokens in the cache after this step (cached + new)
    block_tables: list[list[int]]
    decode_rows: list[int]  # sequences with exactly one new token
    prefill_rows: list[int]
    decode_token_index: torch.Tensor | None = None  # [Bd] long: their token positions in the step
    decode_block_tables: torch.Tensor | None = None  # [Bd, max_blocks] int32, padded
    decode_context_lens: torch.Tensor | None = None  # [Bd] int32


class PagedAttention:
    """The attention context of one engine step (shared by all layers)."""

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata, block_size: int,
                 kernels=None):
        self.kv_caches = kv_caches
        self.meta = meta
        self.block_size = block_size
        self.kernels = kernels
        self._prefill_inputs: dict[int, torch.Tensor] = {}  # per row, shared by all layers: cache block index
        self._prefill_masks: dict[int, torch.Tensor] = {}  # and, for SDPA, the causal mask
        # the CPU kernel's causal prefill attention (sgemm-based flash attention, ~2x SDPA at 512 tokens)
        self._cpu_prefill = bool(kernels is not None and kv_caches and kv_caches[0][0].device.type == "cpu"
                                 and kernels.has_sgemm())

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[layer_idx]
        meta = self.meta
        if self.kernels is not None and k_cache.device.type == "cpu":
            self.kernels.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        else:
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if not meta.prefill_rows and meta.decode_token_index is not None and q.shape[2] == len(meta.decode_rows):
            return self._decode(q[0].transpose(0, 1), k_cache, v_cache, scale).transpose(0, 1).unsqueeze(0)
        out = torch.empty_like(q)
        if meta.decode_rows:
            rows = meta.decode_token_index
            out[0, :, rows] = self._decode(q[0, :, rows].transpose(0, 1), k_cache, v_cache, scale).transpose(0, 1)
        for row in meta.prefill_rows:
            a, b = meta.query_start[row], meta.query_start[row + 1]
            out[:, :, a:b] = self._prefill(row, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], k_cache, v_cache, scale)
        return out

    # ---- decode: one query per sequence -------------------------------------------------------------
    def _decode(self, q: torch.Tensor, k_cache, v_cache, scale: float) -> torch.Tensor:
        """q [Bd, num_heads, head_dim] -> [Bd, num_heads, head_dim]."""
        meta = self.meta
        if self.kernels is not None and q.device.type == "cpu":
            return self.kernels.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                       meta.decode_context_lens, scale)
        return gather_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale)

    # ---- prefill chunk of one sequence ----------------------------------------------------------------
    def _prefill(self, row: int, q, k, v, k_cache, v_cache, scale: float) -> torch.Tensor:
        n, ctx = q.shape[2], self.meta.context_lens[row]
        if ctx == n:  # the chunk starts the sequence: its own keys are all there is
            keys, values = k, v
        else:
            index = self._prefill_inputs.get(row)
            if index is None:
                index = self._make_prefill_inputs(row, ctx, q.device)
            keys = k_cache[index].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)  # [1, nkv, ctx, hd]
            values = v_cache[index].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
        if self._cpu_prefill and keys.dtype == q.dtype and q.dtype in (torch.float32, torch.bfloat16):
            return self.kernels.prefill_attention(q, keys, values, scale, ctx - n)
        if ctx == n:
            return sdpa(q, k, v, scale, is_causal=n > 1)
        return sdpa(q, keys.to(q.dtype), values.to(q.dtype), scale, attn_mask=self._prefill_mask(row, n, ctx, q.device))

    def _make_prefill_inputs(self, row: int, ctx: int, device) -> torch.Tensor:
        blocks = self.meta.block_tables[row][: -(-ctx // self.block_size)]
        self._prefill_inputs[row] = index = torch.tensor(blocks, device=device)
        return index

    def _prefill_mask(self, row: int, n: int, ctx: int, device) -> torch.Tensor:
        """[n, ctx] bottom-right causal mask of a later chunk, for SDPA only (the CPU kernel takes the offset)."""
        mask = self._prefill_masks.get(row)
        if mask is None:
            positions = torch.arange(ctx - n, ctx, device=device)
            self._prefill_masks[row] = mask = torch.arange(ctx, device=device)[None, :] <= positions[:, None]
        return mask


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k/v [1, num_kv_heads, T, head_dim] into the flat slots of the caches."""
    flat_k = k_cache.view(-1, k_cache.shape[-2], k_cache.shape[-1])
    flat_v = v_cache.view(-1, v_cache.shape[-2], v_cache.shape[-1])
    flat_k.index_copy_(0, slot_mapping, k[0].transpose(0, 1).to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, v[0].transpose(0, 1).to(v_cache.dtype))


def gather_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """Reference decode attention: gather each row's blocks (padded to the longest), mask, one SDPA."""
    rows, max_blocks = block_tables.shape
    keys = k_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)  # [Bd, nkv, max_blocks * bs, hd]
    values = v_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)
    visible = torch.arange(keys.shape[2], device=q.device)[None, :] < context_lens[:, None]
    out = sdpa(q.unsqueeze(2), keys.to(q.dtype), values.to(q.dtype), scale, attn_mask=visible[:, None, None, :])
    return out.squeeze(2)


def sdpa(q, k, v, scale: float, is_causal: bool = False, attn_mask=None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
