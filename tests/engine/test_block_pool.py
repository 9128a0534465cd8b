"""The block pool never loses or double-counts a block."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.block_pool import BlockPool, BlockTable, NoFreeBlocks

ACTIONS = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free"]), st.integers(0, 40)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ACTIONS)
def test_any_sequence_of_operations_keeps_exact_accounting(actions):
    pool = BlockPool(num_blocks=24, block_size=4)
    tables: list[BlockTable] = []
    for action, n in actions:
        try:
            if action == "new":
                table = BlockTable(pool)
                table.ensure_capacity(n)
                tables.append(table)
            elif action == "append" and tables:
                tables[n % len(tables)].append_tokens(n % 9)
            elif action == "fork" and tables:
                tables.append(tables[n % len(tables)].fork())
            elif action == "free" and tables:
                tables.pop(n % len(tables)).release()
        except NoFreeBlocks:
            pass
        holders = [0] * pool.num_blocks
        for table in tables:
            for block in table.block_ids:
                holders[block] += 1
        assert [pool.refcount(b) for b in range(pool.num_blocks)] == holders
        assert pool.num_free == holders.count(0)
    for table in tables:
        table.release()
    assert pool.num_free == pool.num_blocks


def test_allocation_is_all_or_nothing():
    pool = BlockPool(num_blocks=3, block_size=4)
    table = BlockTable(pool)
    with pytest.raises(NoFreeBlocks):
        table.ensure_capacity(13)
    assert pool.num_free == 3 and table.block_ids == []


def test_double_free_is_refused():
    pool = BlockPool(num_blocks=2, block_size=4)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(ValueError):
        pool.free(ids)


def test_release_before_returns_only_blocks_wholly_before_the_position():
    pool = BlockPool(num_blocks=8, block_size=4)
    table = BlockTable(pool)
    table.ensure_capacity(20)  # 5 blocks
    held = list(table.block_ids)
    assert table.release_before(7) == 1  # block 0 (tokens 0..3) only: token 7 is in block 1
    assert table.release_before(7) == 0 and table.release_before(3) == 0
    assert table.release_before(16) == 3  # blocks 1..3
    assert pool.num_free == 3 + 4 and table.block_ids == [held[4]] * 5
    assert table.slot(17) == held[4] * 4 + 1  # positions keep their index
    assert table.release_before(100) == 0  # the last block is always kept
    table.release()
    assert pool.num_free == pool.num_blocks
