"""The KV transfer plane alone across two hosts: a gloo channel from host a to host b."""
import json
import sys
from pathlib import Path

import kv_peer

PEER = str(Path(kv_peer.__file__))


def test_a_gloo_channel_between_two_hosts_moves_blocks_exactly(network):
    a, b = network.hosts["a"], network.hosts["b"]
    receiver = b.popen([sys.executable, PEER, "receive", b.address], stdout=-1, text=True)
    try:
        address = receiver.stdout.readline()
        assert json.loads(address)["host"] == b.address
        sent = a.run([sys.executable, PEER, "send", address], timeout_s=60)
        assert sent.returncode == 0, sent.stderr[-3000:]
        received = json.loads(receiver.stdout.readline())
    finally:
        receiver.kill()
        receiver.wait()
    assert received["ok"], received["detail"]
    assert abs(received["sum"] - kv_peer.expected_sum()) < 1e-3
