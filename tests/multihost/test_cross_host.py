"""1 prefill replica on host a, 1 decode replica on host b: every KV handoff and token stream crosses hosts."""
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from client import generate, generate_all, start_all
from ray_nodes import PdserveOnHost, host_of
from tiny_models import reference_tokens

CONFIG = """
prefill: {replicas: 1, gpus_per_replica: 0, ray_resources: {pnode: 1}}
decode: {replicas: 1, gpus_per_replica: 0, ray_resources: {dnode_b: 1}}
router: {ray_resources: {pnode: 0.01}}
transfer: {timeout_s: 10}
limits: {request_timeout_s: 60}
"""

rng = random.Random(18)
REQUESTS = [([rng.randrange(3, 49000) for _ in range(rng.randrange(1, 60))], rng.randrange(1, 16)) for _ in range(8)]


@pytest.fixture(scope="module")
def server(ray_cluster, chat_model):
    server = PdserveOnHost(ray_cluster, "a", chat_model[0], CONFIG)
    server.wait_pool("prefill", 1, timeout_s=60)
    server.wait_pool("decode", 1, timeout_s=60)
    yield server
    server.stop()


def assert_all_blocks_free(server: PdserveOnHost) -> None:
    decode = server.wait_all_blocks_free()
    assert decode and all(r["num_blocks_used"] == 0 for r in decode.values()), decode


def test_prefill_on_a_and_decode_on_b_equal_transformers(server, network, chat_model):
    placed = {pool: {host_of(network, r["pid"]) for r in server.pool(pool).values()} for pool in ("prefill", "decode")}
    assert placed == {"prefill": {"a"}, "decode": {"b"}}

    outcomes = generate_all(server.grpc_address, REQUESTS)

    for (prompt, max_tokens), outcome in zip(REQUESTS, outcomes):
        assert not outcome.error
        assert outcome.tokens == reference_tokens(chat_model[1], prompt, max_tokens)
    assert_all_blocks_free(server)


def test_a_slow_link_shows_in_the_handoff_timing(server, network, chat_model):
    prompt, rate_bit_s = [(7 * i) % 40000 + 3 for i in range(600)], 2e6
    fast = generate(server.grpc_address, prompt, 4)
    network.slow_down("b", rate_bit_s)
    try:
        slow = generate(server.grpc_address, prompt, 4, timeout_s=60)
    finally:
        network.restore("b")

    assert not fast.error and not slow.error, (fast.error, slow.error)
    assert slow.tokens == fast.tokens == reference_tokens(chat_model[1], prompt, 4)
    # The KV of 600 tokens cannot cross a 2 Mbit/s link in less than its size over the rate.
    wire_s = slow.timings["kv_bytes"] * 8 / rate_bit_s
    assert slow.timings["kv_transfer_s"] > 0.7 * wire_s > 5 * fast.timings["kv_transfer_s"], (fast.timings, slow.timings)
    assert_all_blocks_free(server)


def test_a_partition_holds_requests_within_their_deadlines_and_leaks_nothing(server, network, chat_model):
    patient = [([40 + i, 41, 42], 100) for i in range(2)]  # deadline far past the partition
    hasty = [([50 + i, 41, 42], 100) for i in range(2)]  # sent into the partition, deadline inside it
    with ThreadPoolExecutor(len(patient) + len(hasty)) as pool:
        waited, futures = start_all(pool, server.grpc_address, patient, timeout_s=90)
        assert all(o.started.wait(60) for o in waited)
        network.partition("b")
        try:
            cut_off, cut_futures = start_all(pool, server.grpc_address, hasty, timeout_s=3)
            for future in cut_futures:
                future.result(timeout=30)
            time.sleep(2)  # the partition lasts 5 s in all
        finally:
            network.heal("b")
        for future in futures:
            future.result(timeout=120)

    # TCP rides out a partition of seconds: the patient requests finish whole and exact ...
    for (prompt, max_tokens), outcome in zip(patient, waited):
        assert not outcome.error and outcome.tokens == reference_tokens(chat_model[1], prompt, max_tokens)
    # ... and those whose deadline passed inside it end then, with a status that says so.
    assert [o.error.split(":")[0] for o in cut_off] == ["DEADLINE_EXCEEDED"] * len(hasty)
    assert all(o.elapsed_s < 4 for o in cut_off), [o.elapsed_s for o in cut_off]
    assert_all_blocks_free(server)  # their reservations, made once b answered again, released
    after = generate(server.grpc_address, [5, 6, 7], 8, timeout_s=60)
    assert after.tokens == reference_tokens(chat_model[1], [5, 6, 7], 8), after.error
