"""Fixed-size KV blocks: who holds which, counted exactly.

`BlockPool` hands out integer block ids with reference counts (a block shared by
two sequences, as prefix sharing will do, is freed when its last holder lets go).
`BlockTable` is one sequence's list of blocks, grown as its tokens grow; when every
layer of the model attends within a window, the blocks wholly before it can be
returned while the sequence runs (`release_before`).
"""
from __future__ import annotations

from collections import deque
from typing import Sequence


class NoFreeBlocks(RuntimeError):
    """The pool cannot give the blocks asked for; nothing was taken."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refcounts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise NoFreeBlocks(f"asked for {num_blocks} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(num_blocks)]
        for block in ids:
            self._refcounts[block] = 1
        return ids

    def share(self, ids: list[int]) -> None:
        """One more holder for each block (prefix sharing, forks)."""
        for block in ids:
            if self._refcounts[block] <= 0:
                raise ValueError(f"block {block} is not allocated")
            self._refcounts[block] += 1

    def free(self, ids: list[int]) -> None:
        for block in ids:
            if self._refcounts[block] <= 0:
                raise ValueError(f"block {block} freed more often than held")
            self._refcounts[block] -= 1
            if self._refcounts[block] == 0:
                self._free.append(block)

    def refcount(self, block: int) -> int:
        return self._refcounts[block]


class BlockTable:
    """The blocks of one sequence, enough for `num_tokens` tokens."""

    def __init__(self, pool: BlockPool, held: Sequence[int] = ()):
        """`held`: full blocks the table starts with, on which the caller took a reference (a cached prefix)."""
        self.pool = pool
        self.block_ids: list[int] = list(held)
        self.num_tokens = len(self.block_ids) * pool.block_size
        self.num_released = 0  # leading entries already returned to the pool (see release_before)

    def ensure_capacity(self, num_tokens: int) -> None:
        """Allocate blocks so that `num_tokens` tokens fit (all or nothing)."""
        missing = self.pool.blocks_for(num_tokens) - len(self.block_ids)
        if missing > 0:
            self.block_ids.extend(self.pool.allocate(missing))
        self.num_tokens = max(self.num_tokens, num_tokens)

    def append_tokens(self, count: int) -> None:
        self.ensure_capacity(self.num_tokens + count)

    def release_before(self, first_needed: int) -> int:
        """Return the blocks holding only tokens before position `first_needed` (never read again:
        every layer's window starts later); how many were returned.

        Their entries then name the first block still held, so positions keep their index in
        the table and anything that would read them (no attention does) reads this sequence's
        own block, never another's."""
        keep_from = min(first_needed // self.pool.block_size, len(self.block_ids) - 1)
        if keep_from <= self.num_released:
            return 0
        self.pool.free(self.block_ids[self.num_released:keep_from])
        count = keep_from - self.num_released
        self.block_ids[:keep_from] = [self.block_ids[keep_from]] * keep_from
        self.num_released = keep_from
        return count

    def fork(self) -> "BlockTable":
        """A second table sharing these blocks (copy-on-write is the caller's concern)."""
        assert self.num_released == 0, "a table with returned blocks is not forked"
        child = BlockTable(self.pool)
        self.pool.share(self.block_ids)
        child.block_ids = list(self.block_ids)
        child.num_tokens = self.num_tokens
        return child

    def slot(self, position: int) -> int:
        """Flat cache slot of the token at `position`."""
        return self.block_ids[position // self.pool.block_size] * self.pool.block_size + position % self.pool.block_size

    def release(self) -> None:
        self.pool.free(self.block_ids[self.num_released:])
        self.block_ids = []
        self.num_tokens = 0
        self.num_released = 0
