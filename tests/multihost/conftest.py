"""Two test hosts on this machine and one Ray cluster across them, shared by every test here.

Host a runs the Ray head, the prefill pool and the router; host b a worker node.
Each host offers one `dnode` slot, so a two-replica decode pool has one replica on
each host; `dnode_b` pins a pool to host b.
"""
from __future__ import annotations

import pytest

from netns import Network
from ray_nodes import RayCluster

pytestmark = pytest.mark.e2e

HEAD_RESOURCES = {"pnode": 2, "dnode": 1}
WORKER_RESOURCES = {"dnode": 1, "dnode_b": 1}


@pytest.fixture(scope="session")
def network():
    reason = Network.unavailable()
    if reason:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    net = Network.create(["a", "b"])
    yield net
    net.close()


@pytest.fixture(scope="session")
def ray_cluster(network, tmp_path_factory):
    cluster = RayCluster(network, tmp_path_factory.mktemp("multihost-logs"))
    try:
        cluster.start_node("a", HEAD_RESOURCES, head=True)
        cluster.start_node("b", WORKER_RESOURCES)
        yield cluster
    finally:
        cluster.stop()
