"""BlockManager: the paged KV cache's bookkeeping, with prefix caching. Plain Python, no tensors.

The cache is ``num_blocks`` blocks of ``block_size`` token slots; a sequence's ``block_table`` lists the
blocks holding its tokens in order (token ``p`` lives in slot ``block_table[p // block_size] * block_size
+ p % block_size``).

Prefix caching: every *full* block gets a content hash chained over all tokens before it
(``hash(parent hash, block tokens)``), registered once its KV is computed. A new sequence whose leading
blocks have registered hashes takes those blocks (reference counted) instead of recomputing them. A block
whose last user leaves goes to the end of the free queue but keeps its hash, so it can still be found
until it is reused for new content (least recently freed first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    if parent is not None:
        digest.update(parent)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = reused first
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def full_block_hashes(self, seq: Sequence, num_tokens: int) -> list[bytes]:
        """Hashes of the full blocks among the first ``num_tokens`` tokens (memoised on the sequence)."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_tokens // bs:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[: num_tokens // bs]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of the sequence, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for h in self.full_block_hashes(seq, len(seq) - 1):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    # ---- allocation ----------------------------------------------------------------------------------
    def allocate_new(self, seq: Sequence, num_new_tokens: int) -> bool:
        """First scheduling of a waiting sequence: take its cached prefix, then blocks for the new tokens.

        Returns False (changing nothing) when the free blocks do not suffice.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        prefix = self.find_cached_prefix(seq)
        cached_tokens = len(prefix) * self.block_size
        num_new_tokens = min(num_new_tokens, len(seq) - cached_tokens)
        needed = self.blocks_needed(cached_tokens + num_new_tokens) - len(prefix)
        reclaimable = sum(1 for b in prefix if self.blocks[b].ref_count == 0)  # free now, taken by the prefix
        if needed > len(self.free) - reclaimable:
            return False
        for block_id in prefix:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = list(prefix)
        seq.num_computed_tokens = cached_tokens
        if not seq.was_scheduled:
            seq.was_scheduled = True
            seq.num_cached_tokens = min(cached_tokens, seq.num_prompt_tokens)
            self.prefix_queries += seq.num_prompt_tokens
            self.prefix_hits += cached_tokens
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def can_allocate_new(self, seq: Sequence, num_new_tokens: int) -> int:
        """How many new tokens a first scheduling could get (after the cached prefix), or 0."""
        prefix = self.find_cached_prefix(seq)
        cached_tokens = len(prefix) * self.block_size
        reclaimable = sum(1 for b in prefix if self.blocks[b].ref_count == 0)
        available = (len(self.free) - reclaimable + len(prefix)) * self.block_size - cached_tokens
        return max(0, min(num_new_tokens, len(seq) - cached_tokens, available))

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold ``num_tokens`` tokens; False (changing nothing) if blocks run out."""
        needed = self.blocks_needed(num_tokens) - len(seq.block_table)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def register_computed(self, seq: Sequence) -> None:
        """Give hashes to the sequence's blocks that are now full and computed, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        hashes = self.full_block_hashes(seq, seq.num_computed_tokens)
        for i, h in enumerate(hashes):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached:
                block.hash = h
                self.cached[h] = block.block_id

    def free_sequence(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody uses go back to the free queue (hash kept)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # no content worth keeping: reuse first
                else:
                    self.free[block_id] = None
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash = None
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].hash == h}
