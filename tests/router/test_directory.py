"""The router's view of the pools: replicas from their registry reports, ranked by the pool's
policy, what this router sent them counted until their next report."""
import asyncio
import dataclasses


from loads import IDLE_DECODE, IDLE_PREFILL
from pdserve.router.directory import DecodeDirectory, PrefillDirectory


def report(free: int, at: float, draining: bool = False, **extra) -> dict:
    load = dataclasses.replace(IDLE_DECODE, num_blocks_free=free, is_draining=draining)
    return {**dataclasses.asdict(load), "address": f"host:{free}", "kv_block_size": 16,
            "reported_at": at, **extra}


class Registry:
    """The registry's snapshot, as the test sets it."""

    def __init__(self, pools: dict):
        self.pools = pools

    async def snapshot(self) -> dict:
        return self.pools


def ranked_ids(directory: DecodeDirectory, refresh: bool = False) -> list[str]:
    async def go():
        if refresh:
            directory._update(await directory._snapshot())
        return [r.replica_id for r in await directory.ranked()]
    return asyncio.run(go())


def test_least_loaded_counts_its_own_reservations_until_the_next_report():
    registry = Registry({"decode": {"a": report(100, 1.0), "b": report(90, 1.0)}})
    directory = DecodeDirectory(registry.snapshot, "least_loaded")
    assert ranked_ids(directory) == ["a", "b"]
    a = next(r for r in asyncio.run(directory.ranked()) if r.replica_id == "a")
    assert a.address == "host:100"
    directory.reserved(a, 16 * 20)  # 20 blocks: a now has 80 free by this router's count
    assert ranked_ids(directory, refresh=True) == ["b", "a"]  # the same report: the count stays
    registry.pools["decode"]["a"] = report(100, 2.0)  # a new report includes what was reserved
    assert ranked_ids(directory, refresh=True) == ["a", "b"]


def test_failed_and_draining_replicas_are_passed_over_and_other_pools_ignored():
    registry = Registry({"decode": {"a": report(100, 1.0), "b": report(90, 1.0), "c": report(500, 1.0, draining=True)},
                         "prefill": {"p": {"queued_tokens": 0}}})
    directory = DecodeDirectory(registry.snapshot, "least_loaded")
    assert ranked_ids(directory) == ["a", "b"]
    directory.failed("a")
    assert ranked_ids(directory, refresh=True) == ["b"]  # until it reports anew
    registry.pools["decode"]["a"] = report(100, 2.0)
    assert ranked_ids(directory, refresh=True) == ["a", "b"]


def test_round_robin_turns_and_unreadable_reports_are_skipped():
    registry = Registry({"decode": {"a": report(1, 1.0), "b": report(2, 1.0), "bad": {"num_running": 1}}})
    directory = DecodeDirectory(registry.snapshot, "round_robin")
    firsts = [ranked_ids(directory)[0] for _ in range(4)]
    assert sorted(firsts) == ["a", "a", "b", "b"] and firsts[0] != firsts[1]
    assert len(ranked_ids(directory)) == 2


def prefill_report(queued: int, at: float) -> dict:
    load = dataclasses.replace(IDLE_PREFILL, queued_tokens=queued)
    return {**dataclasses.asdict(load), "address": f"host:{queued}", "reported_at": at}


def test_prefill_least_loaded_counts_the_prompts_it_sent():
    registry = Registry({"prefill": {"a": prefill_report(0, 1.0), "b": prefill_report(100, 1.0)},
                         "decode": {"d": report(100, 1.0)}})
    directory = PrefillDirectory(registry.snapshot, "least_loaded")
    assert ranked_ids(directory) == ["a", "b"]
    a = next(r for r in asyncio.run(directory.ranked()) if r.replica_id == "a")
    directory.sent(a, 500)
    assert ranked_ids(directory, refresh=True) == ["b", "a"]
    assert asyncio.run(directory.count()) == 2


def test_prefix_aware_keeps_a_prompt_head_on_one_replica():
    registry = Registry({"prefill": {name: prefill_report(0, 1.0) for name in "abcd"}})
    directory = PrefillDirectory(registry.snapshot, "prefix_aware")

    async def first(prompt):
        return (await directory.ranked(prompt))[0].replica_id

    prompt = list(range(100))
    assert len({asyncio.run(first(prompt + [i])) for i in range(5)}) == 1  # the same 64-token head
    assert len({asyncio.run(first([i] * 80)) for i in range(20)}) > 1  # other heads spread
