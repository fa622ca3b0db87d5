"""ModelRunner: turns a scheduled batch into flat tensors, runs the model, returns the logits to sample.

One forward serves any mix of prefill chunks and decodes: the step's tokens are flattened into
``input_ids`` [T] with their ``positions`` [T]; the paged attention context carries ``slot_mapping``
(where each token's K/V goes), the sequence boundaries, context lengths and block tables; the LM head
runs only at the last token of each sequence that is up to date after the step (``logits_indices``).

The KV cache is one pair of tensors per layer, [num_blocks + 1, block_size, num_kv_heads, head_dim]; the
extra block is scratch space that padded rows of a captured CUDA graph write into.
"""

from __future__ import annotations

import os

import torch

from . import huge_pages
from .attention import AttentionMetadata, PagedAttention
from .fused_decode import MAX_ROWS as MAX_FUSED_ROWS
from .fused_decode import FusedDecode
from .scheduler import ScheduledBatch
from .sequence import Sequence


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, kv_dtype: torch.dtype | None = None,
                 kernels=None, cuda_graphs: bool = False, max_num_seqs: int = 1, max_model_len: int = 0):
        self.model = model
        self.config = model.config
        self.block_size = block_size
        self.num_blocks = num_blocks
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_dtype = kv_dtype or self.dtype
        self.kernels = kernels
        shape = (num_blocks + 1, block_size, self.config.num_key_value_heads, self.config.head_dim)
        layers = self.config.num_hidden_layers
        # CPU: on transparent huge pages where available (decode attention's rows are 2 KiB apart: no TLB
        # miss every other row), zero-filled by the kernel as blocks are first used
        flat = huge_pages.zeros([shape] * (2 * layers), self.kv_dtype) if self.device.type == "cpu" else None
        if flat is None:
            flat = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(2 * layers)]
        self.kv_caches = [(flat[2 * i], flat[2 * i + 1]) for i in range(layers)]
        self.scratch_block = num_blocks
        self.fused = None  # CPU bf16 decode steps in one kernel call (fused_decode.py); None = module route
        if kernels is not None and self.device.type == "cpu" and os.environ.get("QWENLAB_FUSED_DECODE", "1") != "0":
            self.fused = FusedDecode.build(kernels, model, self.kv_caches)
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_num_seqs, max_model_len)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    # ---- inputs ------------------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start, context_lens = [0], []
        logits_indices: list[int] = []
        sample_seqs: list[Sequence] = []
        decode_rows, prefill_rows = [], []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
            (decode_rows if n == 1 else prefill_rows).append(row)
            if end == len(seq):
                logits_indices.append(query_start[-1] - 1)
                sample_seqs.append(seq)
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            query_start=query_start, context_lens=context_lens,
            block_tables=[seq.block_table for seq in batch.seqs],
            decode_rows=decode_rows, prefill_rows=prefill_rows)
        if decode_rows:
            max_blocks = max(len(batch.seqs[r].block_table) for r in decode_rows)
            tables = [batch.seqs[r].block_table + [0] * (max_blocks - len(batch.seqs[r].block_table))
                      for r in decode_rows]
            meta.decode_block_tables = torch.tensor(tables, dtype=torch.int32, device=device)
            meta.decode_context_lens = torch.tensor([context_lens[r] for r in decode_rows], dtype=torch.int32,
                                                    device=device)
            meta.decode_token_index = torch.tensor([query_start[r] for r in decode_rows], dtype=torch.long,
                                                   device=device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        return ids, pos, meta, torch.tensor(logits_indices, dtype=torch.long, device=device), sample_seqs

    # ---- forward -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Run the step; returns (logits [len(sample_seqs), vocab] or None, sample_seqs)."""
        if self.graphs is not None and all(n == 1 and s.num_uncomputed_tokens == 1
                                           for s, n in zip(batch.seqs, batch.num_new_tokens)):
            logits = self.graphs.run(batch)
            if logits is not None:
                return logits, list(batch.seqs)
        ids, pos, meta, logits_indices, sample_seqs = self.prepare(batch)
        if (self.fused is not None and not meta.prefill_rows and len(sample_seqs) == len(batch.seqs)
                and len(sample_seqs) <= MAX_FUSED_ROWS):
            return self.fused.run(ids, pos, meta), sample_seqs
        if not sample_seqs:
            self.model.forward_hidden(ids, pos, PagedAttention(self.kv_caches, meta, self.block_size, self.kernels))
            return None, []
        context = PagedAttention(self.kv_caches, meta, self.block_size, self.kernels)
        logits = self.model(ids, positions=pos, context=context, logits_indices=logits_indices)
        return logits, sample_seqs
