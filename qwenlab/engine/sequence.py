"""Sequence: one completion being generated: its tokens, KV blocks and progress. Plain Python.

A request with ``n`` completions becomes ``n`` sequences sharing the prompt. Progress is one number,
``num_computed_tokens`` (tokens whose KV is in the cache); the scheduler hands each sequence
``len(seq) - num_computed_tokens`` new tokens at most, so a first prefill, a prefill chunk, a decode step,
a recompute after preemption and tokens the engine inserts itself (thinking budget) are all the same
thing. When a step brings a sequence up to date, the model's logits at its last token are sampled.
"""

from __future__ import annotations

import enum
import itertools

import torch

from .params import Logprob, SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 parent: "Sequence | None" = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first scheduling
        self.was_scheduled = False
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained content hashes of its full token blocks (append-only)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        # Sibling completions (n > 1) wait until the first has its prompt in the cache, then share its blocks.
        self.parent = parent
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed((params.seed + 7919 * index) % 2**63)
        self.logprobs: list[Logprob | None] | None = [] if params.logprobs is not None else None
        # Thinking budget: whether the output is inside <think>, and how many tokens were spent there.
        self.in_thinking = False
        self.thinking_tokens = 0
        # Text state, kept by the engine's output processing.
        self.detokenizer = None
        self.text = ""
        self.released_chars = 0  # characters of text already handed out in RequestOutputs
        self.released_tokens = 0

    # ---- sizes ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def prompt_ready(self) -> bool:
        """Whether the prompt's KV is in the cache (siblings may then share its full blocks)."""
        return self.num_computed_tokens >= self.num_prompt_tokens or self.is_finished

    # ---- changes -------------------------------------------------------------------------------------
    def append_token(self, token_id: int, logprob: Logprob | None = None) -> None:
        self.token_ids.append(token_id)
        if self.logprobs is not None:
            self.logprobs.append(logprob)

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone; every token (prompt and output) is recomputed later."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, index={self.index}, len={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, {self.status.value})")
