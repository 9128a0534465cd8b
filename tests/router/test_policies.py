"""Routing policies rank replicas by the typed loads they report."""
import dataclasses

import pytest

from loads import IDLE_DECODE, IDLE_PREFILL
from pdserve.engine.messages import DecodeLoad, LoadReportError, PrefillLoad
from pdserve.router.policies import (
    PREFIX_SLACK_TOKENS, rank_decode_least_loaded, rank_prefill_least_loaded, rank_prefix_aware,
)

def prefill(queued_tokens: int) -> PrefillLoad:
    return dataclasses.replace(IDLE_PREFILL, queued_tokens=queued_tokens)


def decode(free: int, running: int, waiting: int = 0) -> DecodeLoad:
    return dataclasses.replace(IDLE_DECODE, num_blocks_free=free, num_running=running, num_waiting=waiting)


def test_prefill_least_loaded_prefers_the_shortest_queue():
    assert rank_prefill_least_loaded([prefill(900), prefill(10), prefill(300)]) == [1, 2, 0]


def test_decode_least_loaded_prefers_free_blocks_then_small_batches():
    assert rank_decode_least_loaded([decode(10, 1), decode(50, 9), decode(50, 2), decode(50, 1, waiting=5)]) == [2, 3, 1, 0]


def test_policies_rank_on_the_fields_the_workers_report():
    """The ranking reads the reported dict through the typed load: a report that lost a field
    (renamed on one side only) fails loudly instead of ranking every replica as idle."""
    reports = [dataclasses.asdict(prefill(900)), dataclasses.asdict(prefill(10))]
    assert rank_prefill_least_loaded([PrefillLoad.from_dict(r) for r in reports]) == [1, 0]
    renamed = {("num_queued_tokens" if k == "queued_tokens" else k): v for k, v in reports[0].items()}
    with pytest.raises(LoadReportError, match="queued_tokens"):
        PrefillLoad.from_dict(renamed)
    report = dataclasses.asdict(decode(50, 2))
    del report["num_blocks_free"]
    with pytest.raises(LoadReportError, match="num_blocks_free"):
        DecodeLoad.from_dict(report)


def test_prompts_sharing_a_prefix_go_to_one_replica():
    ids = ["a", "b", "c", "d"]
    idle = [prefill(0)] * 4
    system = list(range(100, 164))
    firsts = {rank_prefix_aware(system + [i, i + 1], ids, idle)[0] for i in range(20)}
    assert len(firsts) == 1
    spread = {rank_prefix_aware([i] * 70, ids, idle)[0] for i in range(40)}
    assert len(spread) == 4, "different prefixes spread over the replicas"


def test_prefix_affinity_yields_to_load():
    ids = ["a", "b"]
    prompt = list(range(64))
    preferred = rank_prefix_aware(prompt, ids, [prefill(0), prefill(0)])[0]
    loaded = [prefill(0), prefill(0)]
    loaded[preferred] = prefill(PREFIX_SLACK_TOKENS + 1)
    assert rank_prefix_aware(prompt, ids, loaded)[0] == 1 - preferred
