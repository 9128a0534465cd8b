"""The nccl backend between two GPUs: a sender process on GPU 1 fills a receiver's pool on GPU 0."""
import pytest
import torch

from kv_helpers import (
    check_a_sender_dying_between_layers_fails_the_wait_fast,
    check_two_senders_fill_their_blocks_exactly,
    make_cache,
)
from pdserve.engine.transfer import HandshakeError, make_receiver, make_sender

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

@pytest.fixture
def receiver():
    receiver = make_receiver("nccl", make_cache(num_blocks=32, device="cuda:0"), timeout_s=20.0)
    yield receiver
    receiver.close()


def test_two_senders_on_the_other_gpu_fill_their_blocks_exactly(receiver):
    check_two_senders_fill_their_blocks_exactly(receiver, timeout_s=60.0, backend="nccl", device="cuda:1")


def test_a_sender_that_dies_between_layers_fails_the_wait_fast(receiver):
    check_a_sender_dying_between_layers_fails_the_wait_fast(receiver, backend="nccl", device="cuda:1")


def test_a_sender_on_the_receivers_own_gpu_is_refused_clearly(receiver):
    sender = make_sender("nccl", make_cache(device="cuda:0"), timeout_s=10.0)
    with pytest.raises(HandshakeError, match="nccl needs two GPUs"):
        sender.connect(receiver.address, timeout_s=10.0)
    sender.close()
