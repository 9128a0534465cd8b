"""Full KV blocks of earlier prompts, found again by their token prefix.

A cached block is named by its tokens and by the block before it, so one entry
names one whole prefix; a match walks the prompt block by block from the start
and stops at the first block not cached. Entries keep their tokens and their
parent's key, and a match compares both, so a hash collision can cost a miss
but never wrong KV. The cache holds one reference on each block it keeps (see
`BlockPool`); blocks that only the cache holds are evicted least recently used
first when the pool runs short.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from pdserve.engine.block_pool import BlockPool

_ROOT = 0  # the parent key of a prompt's first block


@dataclass(frozen=True)
class _Entry:
    block_id: int
    parent: int
    tokens: tuple[int, ...]


class PrefixCache:
    def __init__(self, pool: BlockPool, enabled: bool = True):
        """`enabled` False: it keeps nothing and finds nothing (prefix caching off)."""
        self.pool = pool
        self.enabled = enabled
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first

    @property
    def num_blocks(self) -> int:
        return len(self._entries)

    def match(self, tokens: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix of `tokens` (at most `max_blocks` blocks).

        Each returned block gets one more reference, which the caller releases.
        """
        found = []
        for key, parent, block_tokens in self._blocks(tokens, max_blocks):
            entry = self._entries.get(key)
            if entry is None or entry.parent != parent or entry.tokens != block_tokens:
                break
            self._entries.move_to_end(key)
            found.append(entry.block_id)
        self.pool.share(found)
        return found

    def insert(self, tokens: Sequence[int], block_ids: Sequence[int]) -> None:
        """Remember the full blocks of `tokens`, whose KV is computed in `block_ids`."""
        if not self.enabled:
            return
        size = self.pool.block_size
        for index, (key, parent, block_tokens) in enumerate(self._blocks(tokens, len(tokens) // size)):
            if key in self._entries:
                self._entries.move_to_end(key)  # this prompt reused it or computed the same again
                continue
            self._entries[key] = _Entry(block_ids[index], parent, block_tokens)
            self.pool.share([block_ids[index]])

    def evict(self, num_blocks: int) -> int:
        """Free up to `num_blocks` blocks that only the cache holds, least recently used first."""
        if num_blocks <= 0:
            return 0
        evicted = [key for key, entry in self._entries.items() if self.pool.refcount(entry.block_id) == 1]
        evicted = evicted[:num_blocks]
        self.pool.free([self._entries.pop(key).block_id for key in evicted])
        return len(evicted)

    def _blocks(self, tokens: Sequence[int], max_blocks: int):
        """(key, parent key, tokens) of the first `max_blocks` full blocks of `tokens`."""
        size, parent = self.pool.block_size, _ROOT
        for index in range(min(max_blocks, len(tokens) // size)):
            block_tokens = tuple(tokens[index * size : (index + 1) * size])
            key = hash((parent, block_tokens))
            yield key, parent, block_tokens
            parent = key
