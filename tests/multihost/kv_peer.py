"""One end of a gloo KV channel, run as a program on a test host.

    python kv_peer.py receive HOST      prints its address (a JSON line), then the received blocks' sum
    python kv_peer.py send ADDRESS_JSON sends blocks 0..3 of a seeded pool to the receiver's 5..8

No `pdserve serve`, no Ray: only the transfer plane, across two network namespaces.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import torch

from pdserve.engine.kv_cache import KvCache, KvCacheSpec
from pdserve.engine.transfer import ChannelAddress, KvDestination, make_receiver, make_sender
from pdserve.engine.transfer.heads import KvShard

NUM_LAYERS, SEED = 3, 11
SRC_BLOCKS, DEST_BLOCKS = (0, 1, 2, 3), (5, 6, 7, 8)
TRANSFER_ID = 1


def make_cache(seed: int | None = None) -> KvCache:
    cache = KvCache(KvCacheSpec(NUM_LAYERS, 16, block_size=4, num_kv_heads=2, head_dim=8,
                                dtype=torch.float32, device=torch.device("cpu")))
    if seed is not None:
        cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def expected_sum() -> float:
    return float(make_cache(SEED).tensor[:, :, list(SRC_BLOCKS)].sum())


def receive(host: str) -> None:
    receiver = make_receiver("gloo", make_cache(), host=host, timeout_s=20.0)
    receiver.expect(TRANSFER_ID, DEST_BLOCKS, NUM_LAYERS)
    print(json.dumps(dataclasses.asdict(receiver.address)), flush=True)
    outcome = receiver.wait(TRANSFER_ID, timeout_s=30.0)
    landed = float(receiver.kv_cache.tensor[:, :, list(DEST_BLOCKS)].sum())
    print(json.dumps({"ok": outcome.is_ok, "detail": outcome.detail, "sum": landed}), flush=True)
    receiver.close()


def send(address_json: str) -> None:
    fields = json.loads(address_json)
    address = ChannelAddress(**{**fields, "shard": KvShard(**fields["shard"])})
    sender = make_sender("gloo", make_cache(SEED), timeout_s=20.0)
    dest = KvDestination(TRANSFER_ID, DEST_BLOCKS, (address,))
    for layer in range(NUM_LAYERS):
        sender.send_layer(dest, layer, SRC_BLOCKS, 0)
    sender.finish(dest, len(SRC_BLOCKS), timeout_s=30.0)
    sender.close()
    print(json.dumps({"sent": True}), flush=True)


if __name__ == "__main__":
    {"receive": receive, "send": send}[sys.argv[1]](sys.argv[2])
