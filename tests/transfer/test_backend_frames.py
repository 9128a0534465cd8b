"""A backend's own frames reach that backend's handlers through the generic channel (on gloo, in one process).

cuda_ipc's gate and fence (BEGIN/ADMITTED, CANCEL/FENCED) ride this seam; here a gloo
backend with a handler of its own proves the seam on the CPU, both directions.
"""
from __future__ import annotations

import threading

from kv_helpers import make_cache
from pdserve.engine.transfer.channel import ReceiveChannel, SendChannel
from pdserve.engine.transfer.messages import AckStatus, Frame, MessageKind
from pdserve.engine.transfer.torch_dist import TorchDistReceiver, TorchDistSender


class GatedReceiver(TorchDistReceiver):
    """Answers BEGIN itself, then asks the sender to CANCEL that transfer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.begun: list[int] = []

    def _frame_handlers(self):
        return {MessageKind.BEGIN: self._on_begin}

    def _on_begin(self, channel: ReceiveChannel, frame: Frame) -> None:
        self.begun.append(frame.transfer_id)
        channel.reply(MessageKind.ADMITTED, frame.transfer_id, AckStatus.UNKNOWN_TRANSFER)
        channel.reply(MessageKind.CANCEL, frame.transfer_id)


class CancelHearingSender(TorchDistSender):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cancelled: list[int] = []
        self.heard = threading.Event()

    def _open(self, address):
        def on_cancel(frame: Frame) -> None:
            self.cancelled.append(frame.transfer_id)
            self.heard.set()

        return SendChannel(address, self._hello, self.backend, self.kv_cache.spec.device, self._timeout_s,
                           handlers={MessageKind.CANCEL: on_cancel})


def test_each_end_hands_its_backends_frames_to_its_handlers():
    receiver = GatedReceiver(make_cache(num_blocks=8), timeout_s=10.0)
    sender = CancelHearingSender(make_cache(num_blocks=8), timeout_s=10.0)
    try:
        sender.connect(receiver.address, 10.0)
        channel = sender._channel(receiver.address)
        admitted = channel.expect_reply(MessageKind.ADMITTED, 7)
        channel.submit(lambda: channel.send_frame(Frame(MessageKind.BEGIN, 7)))
        assert admitted.result(10.0) == AckStatus.UNKNOWN_TRANSFER
        assert sender.heard.wait(10.0) and sender.cancelled == [7] and receiver.begun == [7]
    finally:
        sender.close()
        receiver.close()


def test_a_frame_no_handler_claims_is_ignored_and_the_channel_still_works():
    receiver = TorchDistReceiver(make_cache(num_blocks=8), timeout_s=10.0)  # gloo: no frames of its own
    sender = TorchDistSender(make_cache(num_blocks=8), timeout_s=10.0)
    try:
        receiver.expect(3, [0, 1])
        sender.connect(receiver.address, 10.0)
        channel = sender._channel(receiver.address)
        channel.submit(lambda: channel.send_frame(Frame(MessageKind.BEGIN, 3)))
        destination = receiver.destination(3, [0, 1])
        for layer in range(receiver.kv_cache.spec.num_layers):
            sender.send_layer(destination, layer, [2, 3], 0)
        sender.finish(destination, 2, 10.0)
        assert receiver.wait(3, 10.0).is_ok
    finally:
        sender.close()
        receiver.close()
