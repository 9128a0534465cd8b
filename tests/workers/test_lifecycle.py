"""A decode sequence's state changes only along the diagram's edges, and its group follows it."""
import threading

import pytest

from pdserve.decode_worker.history_slots import HistorySlots
from pdserve.decode_worker.lifecycle import IllegalTransition, Lifecycle
from pdserve.decode_worker.outbox import Emission
from pdserve.decode_worker.sequence import EDGES, DecodeSequence, SequenceState as S
from pdserve.decode_worker.steps import InFlight
from pdserve.engine.block_pool import BlockPool, BlockTable


def lifecycle_with(n: int, pool: BlockPool, lock: threading.Condition) -> tuple[Lifecycle, list[DecodeSequence]]:
    lifecycle = Lifecycle(None, Emission(), InFlight(), HistorySlots(), lock, "r")
    seqs = []
    for tid in range(1, n + 1):
        table = BlockTable(pool)
        table.ensure_capacity(8)
        seqs.append(DecodeSequence(f"r{tid}", tid, table, 4, 4, deadline=1e18))
        lifecycle.add(seqs[-1])
    return lifecycle, seqs


def test_every_live_state_can_fail_and_terminal_states_go_nowhere():
    assert all(S.FAILED in EDGES[s] for s in S if not s.is_terminal)
    assert not EDGES[S.FINISHED] and not EDGES[S.FAILED]


def test_moves_keep_groups_in_step_and_terminal_ones_free_the_blocks():
    pool, lock = BlockPool(16, 4), threading.Condition()
    lock.acquire()  # the worker's lock: every Lifecycle call runs under it
    lifecycle, (a, b) = lifecycle_with(2, pool, lock)
    lifecycle.move(a, S.LANDING)
    lifecycle.move(b, S.PREFILLING)
    assert lifecycle.of(S.LANDING) == [a] and lifecycle.of(S.PREFILLING) == [b] and lifecycle.num_waiting == 2
    lifecycle.move(a, S.WAITING)
    lifecycle.admit(max_running=8)
    assert lifecycle.of(S.WAITING) == [a], "a sequence never overtakes an earlier local prefill"
    lifecycle.move(b, S.WAITING)
    lifecycle.admit(max_running=8)
    assert lifecycle.of(S.RUNNING) == [b, a]
    with pytest.raises(IllegalTransition):
        lifecycle.move(a, S.LANDING)
    lifecycle.finish(a, "length")
    lifecycle.fail(b, "gone", code=None, notify=False)
    lifecycle.fail(b, "twice", code=None)  # a second end is a no-op
    assert len(lifecycle) == 0 and pool.num_free == pool.num_blocks
    with pytest.raises(IllegalTransition):
        lifecycle.move(a, S.RUNNING)
