"""The cuda_ipc backend on one GPU: a sender in another process writes the receiver's pool directly."""
import functools
import multiprocessing
import time

import pytest
import torch

from kv_helpers import NUM_LAYERS, blocks
from pdserve.engine.kv_cache import KvCache, KvCacheSpec
from pdserve.engine.transfer import TransferError, make_receiver, make_sender

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def cuda_cache(seed: int | None = None) -> KvCache:
    spec = KvCacheSpec(NUM_LAYERS, 16, 4, 2, 8, torch.bfloat16, torch.device("cuda", 0))
    cache = KvCache(spec)
    if seed is not None:
        cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def run_sender(seed: int, results, send) -> None:
    """A child process: a sender over `cuda_cache(seed)` runs `send(sender, results)`, then says "ok"
    (or the TransferError's text) on `results`."""
    sender = make_sender("cuda_ipc", cuda_cache(seed), timeout_s=10.0)
    try:
        send(sender, results)
        results.put("ok")
    except TransferError as e:
        results.put(str(e))
    sender.close()


def two_ranges(dest, sender, results) -> None:
    for layer in range(NUM_LAYERS):
        sender.send_layer(dest, layer, (0, 1), 0)
        sender.send_layer(dest, layer, (5,), 2)
    sender.finish(dest, 3, timeout_s=10.0)


def test_blocks_copied_over_cuda_ipc_equal_the_senders():
    spawn = multiprocessing.get_context("spawn")
    receiver = make_receiver("cuda_ipc", cuda_cache(), timeout_s=10.0)
    receiver.expect(1, (9, 3, 7))
    results = spawn.Queue()
    process = spawn.Process(target=run_sender,
                            args=(1, results, functools.partial(two_ranges, receiver.destination(1, (9, 3, 7)))))
    process.start()

    outcome = receiver.wait(1, timeout_s=30.0)

    assert outcome.is_ok, outcome
    assert results.get(timeout=10.0) == "ok"
    expected = blocks(cuda_cache(1), [0, 1, 5])
    assert torch.equal(blocks(receiver.kv_cache, [9, 3, 7]), expected)
    assert not blocks(receiver.kv_cache, [b for b in range(16) if b not in (9, 3, 7)]).any()
    process.join(10.0)
    receiver.close()


def test_a_cancelled_transfer_is_never_written():
    spawn = multiprocessing.get_context("spawn")
    receiver = make_receiver("cuda_ipc", cuda_cache(), timeout_s=10.0)
    receiver.expect(2, (4, 5, 6))
    receiver.cancel(2)
    results = spawn.Queue()
    process = spawn.Process(target=run_sender,
                            args=(1, results, functools.partial(two_ranges, receiver.destination(2, (4, 5, 6)))))
    process.start()
    assert "UNKNOWN_TRANSFER" in results.get(timeout=30.0)
    assert not receiver.kv_cache.tensor.any()
    process.join(10.0)
    receiver.close()


def two_transfers(warmup, first, second, sender, results) -> None:
    """A warm-up transfer (the process's first allocations may wait for the GPU), then the first
    transfer whole, then the second's first layer behind ~1 s of GPU work: finish the first."""
    for layer in range(NUM_LAYERS):
        sender.send_layer(warmup, layer, (0, 1), 0)
        sender.send_layer(warmup, layer, (2,), 2)
    sender.finish(warmup, 3, timeout_s=10.0)
    torch.cuda.synchronize()
    for layer in range(NUM_LAYERS):
        sender.send_layer(first, layer, (0, 1), 0)
    torch.cuda._sleep(2_000_000_000)  # the compute stream busy for about a second
    sender.send_layer(second, 0, (2,), 0)
    started = time.monotonic()
    sender.finish(first, 2, timeout_s=10.0)
    finished = time.monotonic()
    torch.cuda.synchronize()
    results.put((finished - started, time.monotonic() - started))
    for layer in range(1, NUM_LAYERS):
        sender.send_layer(second, layer, (2,), 0)
    sender.finish(second, 1, timeout_s=10.0)


def test_a_finish_waits_for_its_own_copies_not_for_later_transfers():
    spawn = multiprocessing.get_context("spawn")
    receiver = make_receiver("cuda_ipc", cuda_cache(), timeout_s=10.0)
    receiver.expect(9, (10, 11, 12))
    receiver.expect(1, (3, 4))
    receiver.expect(2, (8,))
    results = spawn.Queue()
    send = functools.partial(two_transfers, receiver.destination(9, (10, 11, 12)), receiver.destination(1, (3, 4)),
                             receiver.destination(2, (8,)))
    process = spawn.Process(target=run_sender, args=(3, results, send))
    process.start()

    assert receiver.wait(9, timeout_s=30.0).is_ok
    assert receiver.wait(1, timeout_s=30.0).is_ok
    finish_s, gpu_busy_s = results.get(timeout=30.0)
    assert receiver.wait(2, timeout_s=30.0).is_ok
    assert results.get(timeout=10.0) == "ok"
    assert finish_s < 0.5 * gpu_busy_s, (finish_s, gpu_busy_s)
    assert torch.equal(blocks(receiver.kv_cache, [3, 4, 8]), blocks(cuda_cache(3), [0, 1, 2]))
    process.join(10.0)
    receiver.close()
