"""KV handoff between TP groups of different sizes: every decode rank gets exactly its kv heads."""
import threading

import pytest
import torch

from pdserve.engine.kv_cache import KvCache, KvCacheSpec
from pdserve.engine.sharding import kv_head_range
from pdserve.engine.transfer import KvDestination, KvShard, TransferError, make_receiver, make_sender
from pdserve.engine.transfer.heads import delivered_heads

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM = 3, 12, 4, 4
SRC_BLOCKS, DST_BLOCKS = (0, 1, 2), (9, 4, 7)


def allowed(num_heads: int, size: int) -> bool:
    return num_heads % size == 0 or size % num_heads == 0


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_every_decode_rank_gets_each_of_its_heads_from_exactly_one_prefill_rank(num_heads):
    for a in [s for s in (1, 2, 4, 8) if allowed(num_heads, s)]:
        for b in [s for s in (1, 2, 4, 8) if allowed(num_heads, s)]:
            senders = [KvShard(i, a, num_heads) for i in range(a)]
            for j in range(b):
                receiver = KvShard(j, b, num_heads)
                got = [h for s in senders for h in delivered_heads(s, receiver)]
                assert got == list(receiver.heads), (a, b, j)


def full_kv(num_heads: int) -> torch.Tensor:
    """The whole model's KV for some blocks: [layers, 2, blocks, block_size, heads, head_dim]."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn((NUM_LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, num_heads, HEAD_DIM), generator=generator)


def rank_cache(shard: KvShard, full: torch.Tensor | None) -> KvCache:
    """One rank's pool: its heads of `full`, or zeros."""
    heads = shard.heads
    spec = KvCacheSpec(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, len(heads), HEAD_DIM, torch.float32, torch.device("cpu"))
    cache = KvCache(spec)
    if full is not None:
        cache.tensor.copy_(full[:, :, :, :, heads.start:heads.stop])
    return cache


def send_all(sender, dest: KvDestination, skip_layers: bool = False) -> str:
    try:
        if not skip_layers:
            for layer in range(NUM_LAYERS):
                sender.send_layer(dest, layer, SRC_BLOCKS, 0)
        sender.finish(dest, len(SRC_BLOCKS), timeout_s=20.0)
        return "ok"
    except TransferError as e:
        return f"failed: {e}"


def handoff(backend: str, num_heads: int, a: int, b: int, silent_rank: int | None = None):
    """Prefill TP a -> decode TP b; returns (decode caches, outcomes, sender results)."""
    full = full_kv(num_heads)
    receivers = [make_receiver(backend, rank_cache(KvShard(j, b, num_heads), None), peer_id=f"decode-r{j}",
                               timeout_s=20.0, shard=KvShard(j, b, num_heads)) for j in range(b)]
    senders = [make_sender(backend, rank_cache(KvShard(i, a, num_heads), full), sender_id=f"prefill-r{i}",
                           timeout_s=20.0, shard=KvShard(i, a, num_heads)) for i in range(a)]
    try:
        for receiver in receivers:
            receiver.expect(1, DST_BLOCKS)
        dest = KvDestination.of_ranks([r.destination(1, DST_BLOCKS) for r in receivers])
        results = [None] * a

        def run(i: int) -> None:
            results[i] = send_all(senders[i], dest, skip_layers=i == silent_rank)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(a)]
        for t in threads:
            t.start()
        outcomes = [r.wait(1, timeout_s=20.0) for r in receivers]
        for t in threads:
            t.join(30)
        return full, receivers, outcomes, results
    finally:
        for sender in senders:
            sender.close()
        for receiver in receivers:
            receiver.close()


@pytest.mark.parametrize("backend", ["gloo", "fake"])
@pytest.mark.parametrize("num_heads, a, b", [(2, 2, 1), (2, 1, 2), (4, 4, 2), (2, 1, 4), (1, 2, 1)])
def test_handoff_between_tp_sizes_delivers_each_rank_its_heads(backend, num_heads, a, b):
    full, receivers, outcomes, results = handoff(backend, num_heads, a, b)
    assert all(o.is_ok for o in outcomes), outcomes
    assert results == ["ok"] * a
    for j, receiver in enumerate(receivers):
        heads = kv_head_range(num_heads, b, j)
        expected = full[:, :, list(SRC_BLOCKS)][..., heads.start:heads.stop, :]
        assert torch.equal(receiver.kv_cache.tensor[:, :, list(DST_BLOCKS)], expected)


def test_a_prefill_rank_that_sent_nothing_fails_the_transfer_on_the_ranks_it_feeds():
    # prefill TP 2 -> decode TP 1, 2 heads: rank 1 owns head 1 and finishes without sending it
    _, _, outcomes, results = handoff("gloo", 2, 2, 1, silent_rank=1)
    assert not outcomes[0].is_ok and "missing" in outcomes[0].detail
    assert results[1].startswith("failed")
