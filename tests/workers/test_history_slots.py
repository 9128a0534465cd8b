"""Which running sequences hold a token-history slot, and when a slot is filled."""
from pdserve.decode_worker.history_slots import HistorySlots
from pdserve.decode_worker.sequence import DecodeSequence
from pdserve.engine.block_pool import BlockPool, BlockTable
from pdserve.engine.messages import SamplingParams

PENALTY = SamplingParams(frequency_penalty=0.5)


def sequence(i: int, params: SamplingParams) -> DecodeSequence:
    seq = DecodeSequence(f"r{i}", i, BlockTable(BlockPool(4, 4)), 2, 8, 0.0, params=params,
                         stop_ids=frozenset({1}))
    seq.prompt, seq.generated = [3, 4], [5]
    return seq


def test_a_batch_without_rules_has_no_histories():
    """The runner then samples as it always did: no history, no extra device work."""
    assert HistorySlots().histories([sequence(i, SamplingParams(temperature=1.0)) for i in range(3)],
                                    [False, True, False]) is None


def test_a_slot_is_filled_once_and_reused_lowest_first_once_given_back():
    slots = HistorySlots()
    a, b, plain, bias = (sequence(0, PENALTY), sequence(1, PENALTY), sequence(2, SamplingParams()),
                         sequence(3, SamplingParams(min_tokens=3)))
    first = slots.histories([a, plain, b, bias], [False, False, False, True])
    assert [h.slot if h else None for h in first] == [0, None, 1, None]
    assert first[0].fill.prompt == (3, 4) and first[0].fill.output == (5,)
    assert first[3].num_output == 2 and first[3].slot is None and first[3].fill is None  # its token in flight
    again = slots.histories([a, b], [True, True])
    assert [(h.slot, h.fill, h.num_output) for h in again] == [(0, None, 2), (1, None, 2)]
    slots.release(a)
    c = sequence(4, PENALTY)
    assert slots.histories([c, b], [False, True])[0].slot == 0 and a.history_slot is None
