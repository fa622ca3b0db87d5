"""CUDA graphs for decode steps (GPU only; written for CUDA, not exercised on CPU-only machines).

A decode step of B sequences is a fixed sequence of kernels once B and the number of cache blocks the
longest sequence spans are fixed, so it can be captured once and replayed with one launch. Batch sizes
are rounded up to a bucket (1, 2, 4, 8, 16, 24, 32, ... max_num_seqs) and block counts to a power of
two; padded rows write their K/V into the runner's scratch block and attend to it alone. Graphs are
captured lazily on first use and share one memory pool. Steps with prefill chunks, MoE models (their
expert dispatch reads counts on the host) and dynamic-NTK RoPE (it reads the longest position) run
eagerly.
"""

from __future__ import annotations

import torch

from .attention import AttentionMetadata, PagedAttention

MAX_GRAPHS = 96


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max(max_num_seqs, 16) + 1, 8))
    return sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int):
        self.runner = runner
        config = runner.config
        self.enabled = not config.is_moe and config.rope_type != "dynamic"
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks = -(-max(max_model_len, 1) // runner.block_size)
        device = runner.device
        b, n = self.buckets[-1], self.max_blocks
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(b, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(b, n, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(b, dtype=torch.int32, device=device)
        self.token_index = torch.arange(b, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _key(self, batch_size: int, blocks: int) -> tuple[int, int] | None:
        size = next((s for s in self.buckets if s >= batch_size), None)
        span = 8
        while span < blocks:
            span *= 2
        span = min(span, self.max_blocks)
        if size is None or blocks > span:
            return None
        return size, span

    def run(self, batch) -> torch.Tensor | None:
        """Logits [len(batch), vocab] of a decode-only batch, or None to run it eagerly."""
        if not self.enabled:
            return None
        seqs = batch.seqs
        key = self._key(len(seqs), max(len(s.block_table) for s in seqs))
        if key is None or (key not in self.graphs and len(self.graphs) >= MAX_GRAPHS):
            return None
        self._fill(seqs, key)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[: len(seqs)]

    def _fill(self, seqs, key) -> None:
        size, span = key
        bs, scratch = self.runner.block_size, self.runner.scratch_block
        ids, pos, slots, lens = [], [], [], []
        tables = torch.full((size, span), scratch, dtype=torch.int32)
        for i, seq in enumerate(seqs):
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        pad = size - len(seqs)
        ids += [0] * pad
        pos += [0] * pad
        slots += [scratch * bs] * pad
        lens += [1] * pad
        self.input_ids[:size].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(pos), non_blocking=True)
        self.slot_mapping[:size].copy_(torch.tensor(slots), non_blocking=True)
        self.context_lens[:size].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)
        self.block_tables[:size, :span].copy_(tables, non_blocking=True)

    def _forward(self, size: int, span: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], query_start=list(range(size + 1)), context_lens=[],
            block_tables=[], decode_rows=list(range(size)), prefill_rows=[],
            decode_token_index=self.token_index[:size], decode_block_tables=self.block_tables[:size, :span],
            decode_context_lens=self.context_lens[:size])
        context = PagedAttention(self.runner.kv_caches, meta, self.runner.block_size)
        model = self.runner.model
        # model.forward_hidden without its host-side id check (a device sync is not capturable)
        h = model.model.embed_tokens(self.input_ids[:size].unsqueeze(0))
        cos, sin = model.model.rotary(self.positions[:size], h.dtype)
        for layer in model.model.layers:
            h, _ = layer(h, cos, sin, context)
        return model.lm_head(model.model.norm(h))[0]

    def _capture(self, size: int, span: int):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (allocator, lazy inits) outside the graph
                self._forward(size, span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size, span)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, logits
