"""Scheduler: which sequences run in the next step, and how many tokens each. Plain Python.

Each step has a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``).
Running sequences come first, decodes before prefill chunks, so generation never stalls behind a long
prompt; the rest of the budget goes to waiting sequences in arrival order, a prompt that does not fit
being split across steps (chunked prefill). When the cache runs out of blocks, the most recently
arrived running sequence is preempted: its blocks are freed and it is recomputed later (its full blocks
usually come straight back from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """Sequences of one step with the number of new tokens each computes (in this order in the batch)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # Decodes first, then prefill chunks of running sequences, each in arrival order.
        order = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)
        scheduled: set[int] = set()
        for seq in order:
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + n):
                victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled), None)
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                scheduled.add(seq.seq_id)
                budget -= n
        if batch.preempted:
            return batch  # no admissions while memory is short
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.parent is not None and not seq.parent.prompt_ready:
                skipped.append(self.waiting.popleft())  # let the first sibling fill the shared prompt blocks
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.allocate_new(seq, n):
                break
            self.waiting.popleft()
            n = min(n, seq.num_uncomputed_tokens)  # the cached prefix may cover part of it
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return batch

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch) -> None:
        """After the forward: the scheduled tokens are computed; register newly full blocks."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_computed(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
