"""FP8 KV pools over gloo: blocks arrive bit-exact, and a peer with another KV dtype or other KV
scales is refused clearly."""
import pytest
import torch

from kv_helpers import check_two_senders_fill_their_blocks_exactly, make_cache
from pdserve.engine.transfer import HandshakeError, make_receiver, make_sender

FP8 = torch.float8_e4m3fn


@pytest.fixture
def fp8_receiver():
    receiver = make_receiver("gloo", make_cache(num_blocks=32, dtype=FP8), timeout_s=10.0)
    yield receiver
    receiver.close()


def test_fp8_blocks_arrive_bit_exact(fp8_receiver):
    """Every byte of the FP8 blocks (compared as uint8: NaN-free and exact) lands where it should."""
    check_two_senders_fill_their_blocks_exactly(fp8_receiver, dtype=FP8)


def test_fp8_pool_sends_half_the_bytes():
    assert make_cache(dtype=FP8).spec.bytes_per_block * 2 == make_cache(dtype=torch.bfloat16).spec.bytes_per_block


@pytest.mark.parametrize("backend", ["gloo", "fake"])
def test_a_peer_with_another_kv_dtype_is_refused_naming_the_setting(backend):
    receiver = make_receiver(backend, make_cache(dtype=FP8), timeout_s=10.0)
    sender = make_sender(backend, make_cache(dtype=torch.bfloat16), timeout_s=10.0)
    try:
        with pytest.raises(HandshakeError, match="KV dtype .*kv_cache.dtype"):
            sender.connect(receiver.address, timeout_s=10.0)
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("backend", ["gloo", "fake"])
def test_a_peer_with_other_fp8_kv_scales_is_refused_naming_the_layer(backend):
    calibrated = ((0.5, 0.25),) * 4
    other = calibrated[:2] + ((0.5, 0.125),) + calibrated[3:]
    receiver = make_receiver(backend, make_cache(dtype=FP8, scales=calibrated), timeout_s=10.0)
    same = make_sender(backend, make_cache(dtype=FP8, scales=calibrated), timeout_s=10.0)
    different = make_sender(backend, make_cache(dtype=FP8, scales=other), timeout_s=10.0)
    try:
        same.connect(receiver.address, timeout_s=10.0)  # the same checkpoint's scales: accepted
        with pytest.raises(HandshakeError, match="FP8 KV scales differ \\(layer 2"):
            different.connect(receiver.address, timeout_s=10.0)
    finally:
        same.close()
        different.close()
        receiver.close()
