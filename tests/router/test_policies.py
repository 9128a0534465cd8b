"""Routing policies rank replicas by what they report."""
from pdserve.router.policies import (
    PREFIX_SLACK_TOKENS, rank_decode_least_loaded, rank_prefill_least_loaded, rank_prefix_aware,
)


def test_prefill_least_loaded_prefers_the_shortest_queue():
    stats = [{"queued_tokens": 900}, {"queued_tokens": 10}, {"queued_tokens": 300}]
    assert rank_prefill_least_loaded(stats) == [1, 2, 0]


def test_decode_least_loaded_prefers_free_blocks_then_small_batches():
    stats = [{"num_blocks_free": 10, "num_running": 1}, {"num_blocks_free": 50, "num_running": 9},
             {"num_blocks_free": 50, "num_running": 2}]
    assert rank_decode_least_loaded(stats) == [2, 1, 0]


def test_prompts_sharing_a_prefix_go_to_one_replica():
    ids = ["a", "b", "c", "d"]
    idle = [{"queued_tokens": 0}] * 4
    system = list(range(100, 164))
    firsts = {rank_prefix_aware(system + [i, i + 1], ids, idle)[0] for i in range(20)}
    assert len(firsts) == 1
    spread = {rank_prefix_aware([i] * 70, ids, idle)[0] for i in range(40)}
    assert len(spread) == 4, "different prefixes spread over the replicas"


def test_prefix_affinity_yields_to_load():
    ids = ["a", "b"]
    prompt = list(range(64))
    preferred = rank_prefix_aware(prompt, ids, [{"queued_tokens": 0}, {"queued_tokens": 0}])[0]
    loaded = [{"queued_tokens": 0}, {"queued_tokens": 0}]
    loaded[preferred] = {"queued_tokens": PREFIX_SLACK_TOKENS + 1}
    assert rank_prefix_aware(prompt, ids, loaded)[0] == 1 - preferred
