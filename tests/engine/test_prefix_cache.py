"""The prefix cache: longest full-block prefix found, references exact, only unheld blocks evicted."""
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.prefix_cache import PrefixCache


def cached_prompt(cache: PrefixCache, tokens: list[int]) -> list[int]:
    """Allocate blocks for `tokens` as a finished prefill would, cache them, let the prefill go."""
    ids = cache.pool.allocate(cache.pool.blocks_for(len(tokens)))
    cache.insert(tokens, ids)
    cache.pool.free(ids)
    return ids


def test_a_prompt_finds_the_full_blocks_it_shares_and_no_more():
    cache = PrefixCache(BlockPool(16, 4))
    ids = cached_prompt(cache, list(range(10)))  # blocks [0-3], [4-7] full; [8, 9] partial, not cached

    assert cache.num_blocks == 2
    assert cache.match(list(range(10)) + [99], max_blocks=10) == ids[:2]
    assert cache.match([0, 1, 2, 3, 4, 5, 6, 99], max_blocks=10) == ids[:1]  # second block differs
    assert cache.match([5, 1, 2, 3, 4, 5, 6, 7], max_blocks=10) == []  # first block differs
    assert cache.match(list(range(10)), max_blocks=1) == ids[:1]


def test_the_same_block_tokens_after_another_prefix_do_not_match():
    cache = PrefixCache(BlockPool(16, 4))
    cached_prompt(cache, [1, 1, 1, 1, 2, 2, 2, 2])

    assert cache.match([3, 3, 3, 3, 2, 2, 2, 2], max_blocks=2) == []


def test_matched_blocks_are_held_until_released_and_only_unheld_blocks_are_evicted():
    pool = BlockPool(8, 4)
    cache = PrefixCache(pool)
    ids = cached_prompt(cache, list(range(8)))
    assert [pool.refcount(b) for b in ids] == [1, 1]  # the cache's own reference

    held = cache.match(list(range(8)), max_blocks=1)
    assert pool.refcount(held[0]) == 2
    assert cache.evict(8) == 1  # the second block; the first is in use
    assert cache.num_blocks == 1 and pool.num_free == 7

    pool.free(held)
    assert cache.evict(8) == 1 and pool.num_free == 8 and cache.num_blocks == 0
    assert cache.evict(0) == 0 and cache.evict(-3) == 0


def test_eviction_takes_the_least_recently_used_first():
    pool = BlockPool(8, 2)
    cache = PrefixCache(pool)
    cached_prompt(cache, [1, 2])
    cached_prompt(cache, [3, 4])
    pool.free(cache.match([1, 2, 0], max_blocks=1))  # touch the older one

    assert cache.evict(1) == 1
    assert cache.match([3, 4, 0], max_blocks=1) == [] and cache.num_blocks == 1


def test_a_disabled_cache_keeps_and_finds_nothing():
    cache = PrefixCache(BlockPool(16, 4), enabled=False)
    cached_prompt(cache, list(range(10)))
    assert cache.num_blocks == 0 and cache.match(list(range(10)), max_blocks=10) == []
    assert cache.pool.num_free == 16  # no block held for it
