"""1 prefill replica on host a, 2 decode replicas, one on each host; then host b's replica, and host b, die."""
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from client import generate_all, start_all
from ray_nodes import PdserveOnHost, host_of
from tiny_models import reference_tokens

CONFIG = """
prefill: {replicas: 1, gpus_per_replica: 0, ray_resources: {pnode: 1}}
decode: {replicas: 2, gpus_per_replica: 0, ray_resources: {dnode: 1}}
router: {ray_resources: {pnode: 0.01}, decode_policy: round_robin}
transfer: {timeout_s: 10}
limits: {request_timeout_s: 90}
"""
DEADLINE_S = 90


@pytest.fixture(scope="module")
def server(ray_cluster, chat_model):
    server = PdserveOnHost(ray_cluster, "a", chat_model[0], CONFIG)
    server.wait_pool("prefill", 1, timeout_s=60)
    server.wait_pool("decode", 2, timeout_s=60)
    yield server
    server.stop()


def decode_by_host(server: PdserveOnHost, network) -> dict[str, dict]:
    """{host: stats} of the decode replicas alive now (a dead replica's pid is on no host)."""
    return {host_of(network, r["pid"]): r for r in server.pool("decode").values()}


def wait_decode_on_both_hosts(server: PdserveOnHost, network, timeout_s: float) -> dict[str, dict]:
    end = time.monotonic() + timeout_s
    while set(placed := decode_by_host(server, network)) != {"a", "b"}:
        assert time.monotonic() < end, f"decode pool not on both hosts after {timeout_s} s: {placed}"
        time.sleep(1)
    return placed


def wait_routed_to_both_hosts(server: PdserveOnHost, network, timeout_s: float = 60) -> None:
    """Until two requests at once reach the decode replicas of both hosts: a replacement replica is in
    the pool's reports a moment before the router sends it work."""
    end = time.monotonic() + timeout_s
    while True:
        replicas = {r["replica_id"] for r in wait_decode_on_both_hosts(server, network, timeout_s).values()}
        probes = generate_all(server.grpc_address, [([500, 5], 2), ([501, 5], 2)])
        used = {o.timings.get("decode_replica") for o in probes}
        if replicas <= used:
            return
        assert time.monotonic() < end, f"requests reached {used}, not both hosts' decode replicas {replicas}"
        time.sleep(1)


def assert_exact(outcomes, requests, model) -> None:
    for (prompt, max_tokens), outcome in zip(requests, outcomes):
        assert not outcome.error, outcome.error
        assert outcome.tokens == reference_tokens(model, prompt, max_tokens)


def assert_all_blocks_free(server: PdserveOnHost) -> None:
    decode = server.wait_all_blocks_free()
    assert decode and all(r["num_blocks_used"] == 0 for r in decode.values()), decode


def test_decode_on_both_hosts_equals_transformers(server, network, chat_model):
    wait_decode_on_both_hosts(server, network, timeout_s=30)
    requests = [([100 + i, 7, 8, 9], 6 + i) for i in range(6)]

    outcomes = generate_all(server.grpc_address, requests)

    assert_exact(outcomes, requests, chat_model[1])
    assert len({o.timings["decode_replica"] for o in outcomes}) == 2  # round robin: both hosts decoded
    assert_all_blocks_free(server)


def test_a_decode_replica_killed_mid_stream_on_host_b_loses_no_token(server, network, chat_model):
    wait_routed_to_both_hosts(server, network)
    requests = [([200 + i, 7, 8], 150) for i in range(6)]
    with ThreadPoolExecutor(len(requests)) as pool:
        outcomes, futures = start_all(pool, server.grpc_address, requests, timeout_s=DEADLINE_S)
        assert all(o.started.wait(60) for o in outcomes)
        on_b = wait_running(server, network, "b")
        os.kill(on_b["pid"], signal.SIGKILL)
        for future in futures:
            future.result(timeout=DEADLINE_S + 30)

    assert_exact(outcomes, requests, chat_model[1])
    wait_decode_on_both_hosts(server, network, timeout_s=120)
    assert_all_blocks_free(server)


def test_host_b_dying_fails_its_requests_over_and_its_rejoining_brings_the_pool_back(
        server, network, ray_cluster, chat_model):
    wait_routed_to_both_hosts(server, network)
    requests = [([300 + i, 9, 9], 150) for i in range(6)]
    with ThreadPoolExecutor(len(requests)) as pool:
        outcomes, futures = start_all(pool, server.grpc_address, requests, timeout_s=DEADLINE_S)
        assert all(o.started.wait(60) for o in outcomes)
        wait_running(server, network, "b")
        ray_cluster.kill_node("b")
        for future in futures:
            future.result(timeout=DEADLINE_S + 30)

    # Every request ended in time, and whole: decode on host a took over those of host b.
    assert all(o.elapsed_s < DEADLINE_S for o in outcomes), [o.elapsed_s for o in outcomes]
    assert_exact(outcomes, requests, chat_model[1])

    ray_cluster.rejoin("b")
    wait_decode_on_both_hosts(server, network, timeout_s=180)
    after = [([400 + i, 5], 5) for i in range(4)]
    assert_exact(generate_all(server.grpc_address, after), after, chat_model[1])
    assert_all_blocks_free(server)


def wait_running(server: PdserveOnHost, network, host: str, timeout_s: float = 20) -> dict:
    """Host `host`'s decode replica, once it reports running sequences (reports lag ~0.5 s)."""
    end = time.monotonic() + timeout_s
    while True:
        replica = decode_by_host(server, network).get(host)
        if replica and replica["num_running"] > 0:
            return replica
        assert time.monotonic() < end, f"no sequence running on host {host}: {decode_by_host(server, network)}"
        time.sleep(0.2)
