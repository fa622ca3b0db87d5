"""BlockManager and Scheduler on their own (plain Python): prefix cache, eviction, preemption, invariants."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from qwenlab.engine.block_manager import BlockManager
from qwenlab.engine.params import SamplingParams
from qwenlab.engine.scheduler import Scheduler
from qwenlab.engine.sequence import Sequence, SequenceStatus

PARAMS = SamplingParams(max_tokens=100).resolve()


def seq(tokens, rid="r", parent=None):
    return Sequence(rid, 0, list(tokens), PARAMS, parent=parent)


def compute(bm: BlockManager, s: Sequence, n: int | None = None):
    s.num_computed_tokens += s.num_uncomputed_tokens if n is None else n
    bm.register_computed(s)


def test_prefix_cache_reuses_full_blocks_and_keeps_one_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(10))
    assert bm.allocate_new(a, 10) and a.block_table == [0, 1, 2]
    compute(bm, a)
    assert len(bm.cached) == 2  # two full blocks
    b = seq(list(range(8)) + [50, 51])
    assert bm.allocate_new(b, 10)
    assert b.block_table[:2] == [0, 1] and b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.blocks[0].ref_count == 2
    c = seq(range(8))  # fully cached prompt: the last block is recomputed so there are logits to sample
    assert bm.allocate_new(c, 8) and c.num_computed_tokens == 4 and c.block_table[0] == 0
    assert c.block_table[1] != 1
    assert (bm.prefix_hits, bm.prefix_queries) == (8 + 4, 10 + 10 + 8)


def test_freed_blocks_stay_cached_until_reused_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate_new(a, 5)
    compute(bm, a)
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    b = seq([1, 2, 3, 4, 9])
    bm.allocate_new(b, 5)
    assert b.num_computed_tokens == 4  # found after its owner left
    bm.free_sequence(b)
    big = seq(range(100, 107))  # needs 4 blocks: the unhashed ones go first, then the oldest cached
    bm.allocate_new(big, 7)
    assert len(bm.cached) == 0 and bm.num_free_blocks == 0


def test_blocks_run_out_then_allocation_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(range(9))
    assert bm.allocate_new(a, 9)
    b = seq(range(20, 25))
    assert not bm.allocate_new(b, 5) and b.block_table == [] and bm.num_free_blocks == 0
    assert not bm.ensure_slots(a, 13) and len(a.block_table) == 3


def test_scheduler_chunks_prefill_and_puts_decodes_first():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq(range(3), "a"), seq(range(30), "b")
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.num_new_tokens == [3, 7]
    sched.update(batch)
    a.append_token(1)  # a sampled; b is mid-prefill
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and batch.num_new_tokens == [1, 9]


def test_scheduler_preempts_the_newest_and_recomputes_it():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(range(7), "a"), seq(range(10, 17), "b")
    sched.add(a)
    sched.add(b)
    sched.update(sched.schedule())
    a.append_token(1)
    b.append_token(2)
    sched.update(sched.schedule())  # both grow into their second block: 8 tokens each, cache full
    a.append_token(3)
    b.append_token(4)
    batch = sched.schedule()  # a needs a third block: b is preempted
    assert batch.seqs == [a] and batch.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and sched.waiting[0] is b
    assert sched.num_preemptions == 1


def test_siblings_wait_for_the_first_to_fill_the_prompt():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    first = seq(range(9), "r")
    second = seq(range(9), "r", parent=first)
    sched.add(first)
    sched.add(second)
    batch = sched.schedule()
    assert batch.seqs == [first]
    sched.update(batch)
    first.append_token(5)
    batch = sched.schedule()
    assert batch.seqs == [first, second] and batch.num_new_tokens == [1, 1] and second.num_cached_tokens == 8


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(3, 12), st.sampled_from([1, 2, 4]), st.integers(4, 40))
def test_random_workloads_keep_every_invariant(seed, num_blocks, block_size, budget):
    """Random arrivals, prompts sharing prefixes, growth, aborts: the bookkeeping stays exact, and a
    sequence only ever attends to slots holding its own tokens (prefix reuse is sound)."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget)
    capacity = num_blocks * block_size
    slot_content: dict[int, tuple] = {}  # what "KV" a slot holds: the token prefix it was computed from
    live: list[Sequence] = []
    stems = [[rng.randrange(5) for _ in range(rng.randint(1, capacity))] for _ in range(3)]
    for step in range(60):
        if rng.random() < 0.4 and len(live) < 6:
            stem = rng.choice(stems)
            tokens = (stem[: rng.randint(1, len(stem))] + [rng.randrange(5) for _ in range(rng.randint(0, 3))])
            tokens = tokens[: capacity - 2] or [1]
            s = seq(tokens, f"r{step}")
            s.limit = rng.randint(len(tokens) + 1, capacity)
            sched.add(s)
            live.append(s)
        if rng.random() < 0.1 and live:
            victim = rng.choice(live)
            sched.finish(victim, "abort")
            live.remove(victim)
        batch = sched.schedule()
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            assert len(s.block_table) * block_size >= s.num_computed_tokens + n
            for p in range(s.num_computed_tokens):  # everything it will attend to is its own prefix
                slot = s.block_table[p // block_size] * block_size + p % block_size
                assert slot_content[slot] == tuple(s.token_ids[: p + 1])
            for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
                slot = s.block_table[p // block_size] * block_size + p % block_size
                slot_content[slot] = tuple(s.token_ids[: p + 1])
        sched.update(batch)
        for s in batch.seqs:
            if s.num_uncomputed_tokens == 0:
                s.append_token(rng.randrange(5))
                if len(s) >= s.limit:
                    sched.finish(s, "length")
                    live.remove(s)
        _check_invariants(bm, sched)
    for s in list(live):
        sched.finish(s, "abort")
    assert bm.num_free_blocks == num_blocks


def _check_invariants(bm: BlockManager, sched: Scheduler) -> None:
    refs = [0] * bm.num_blocks
    for s in sched.running:
        for b in s.block_table:
            refs[b] += 1
    for s in sched.waiting:
        assert s.block_table == []
    assert refs == [b.ref_count for b in bm.blocks]
    assert set(bm.free) == {i for i, r in enumerate(refs) if r == 0}
    for h, b in bm.cached.items():
        assert bm.blocks[b].hash == h
