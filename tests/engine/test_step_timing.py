"""The step clock: device busy time beside the loop's period, and the engine's own step times at start."""
import time

import pytest
import torch

from pdserve.engine.loader import load_model_dir
from pdserve.engine.roofline import decode_step_anchors
from pdserve.engine.runner import ModelRunner
from pdserve.engine import step_timing
from pdserve.engine.step_timing import StepClock
from tiny_models import save_tiny_model


class FakeDevice:
    """A device queue the test advances by hand: events complete when it has run past them."""

    def __init__(self):
        self.queued_ms = 0.0  # device time of the work queued so far
        self.done_ms = 0.0  # how far the device has run

    def launch(self, ms: float) -> None:
        self.queued_ms += ms

    def mark(self) -> "FakeEvent":
        return FakeEvent(self, self.queued_ms)


class FakeEvent:
    def __init__(self, device: FakeDevice, at_ms: float):
        self.device, self.at_ms = device, at_ms

    def query(self) -> bool:
        return self.device.done_ms >= self.at_ms

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.query() and end.query(), "elapsed_time of an event that has not completed"
        return end.at_ms - self.at_ms


def test_a_loop_that_spends_most_of_each_step_on_the_host_reads_mostly_idle():
    clock = StepClock(torch.device("cpu"))
    for _ in range(5):
        with clock.work(8):
            time.sleep(0.01)  # the step's compute
        time.sleep(0.03)  # the host's work between steps: emitting tokens, building inputs
        clock.step_done()
    times = clock.times()
    assert times.num_steps == 5 and times.size == 8
    assert times.step_busy_s == pytest.approx(0.01, abs=0.008)
    assert times.wall_s == pytest.approx(0.04, abs=0.02)
    assert 0.5 < times.idle_share < 0.9
    assert times.host_s == pytest.approx(times.wall_s - times.busy_s)


def test_time_with_nothing_to_do_is_not_idle_time():
    clock = StepClock(torch.device("cpu"))
    for _ in range(3):
        clock.waiting()
        time.sleep(0.05)  # no work at all: the loop waits
        with clock.work(1):
            time.sleep(0.01)
        clock.step_done()
    assert clock.times().idle_share < 0.3


def test_device_steps_read_one_step_later_settle_with_their_batch_and_device_time():
    """The decode loop one step ahead: step N+1 is queued before step N's tokens are read, so at each
    step_done the step just queued has not run; its period settles at the next one."""
    device = FakeDevice()
    clock = StepClock(torch.device("cpu"), mark=device.mark)
    for step in range(10):
        with clock.work(32):
            device.launch(4.0)  # 4 ms of device time per step
        if step:  # read the previous step's tokens: the device ran it, and is running this one
            device.done_ms = device.queued_ms - 4.0
            time.sleep(0.008)
            clock.step_done()
    times = clock.times()
    assert times.num_steps == 8 and times.size == 32  # the last period waits for its step
    assert times.step_busy_s == pytest.approx(0.004)
    assert 0 < times.idle_share < 1 and times.num_lost == 0
    device.done_ms = device.queued_ms
    clock.waiting()  # the loop ran dry: the last step settles too
    assert clock.times().num_steps == 9


def test_events_that_never_complete_leave_no_steps_and_no_idle_time_nobody_measured(monkeypatch):
    monkeypatch.setattr(step_timing, "MAX_UNSETTLED", 8)
    device = FakeDevice()
    clock = StepClock(torch.device("cpu"), mark=device.mark)
    for _ in range(20):
        with clock.work(16):
            device.launch(5.0)  # never run: done_ms stays 0
        clock.step_done()
    times = clock.times()
    assert (times.num_steps, times.size, times.idle_share) == (0, 0, 0)
    assert times.num_lost == 12 and len(clock._unsettled) == 8  # bounded, not one per step forever


def test_unsized_work_counts_as_busy_time_but_not_as_a_step_point():
    """A colocated replica's prefill between decode steps: device time of the period, no (batch, time) point."""
    device = FakeDevice()
    clock = StepClock(torch.device("cpu"), mark=device.mark)
    with clock.work():
        device.launch(10.0)
    with clock.work(8):
        device.launch(3.0)
    device.done_ms = device.queued_ms
    clock.step_done()
    times = clock.times()
    assert times.num_steps == 1 and times.size == 8 and times.step_busy_s == pytest.approx(0.003)
    assert times.busy_s == pytest.approx(0.013)


def test_the_engines_own_decode_steps_are_timed_at_start(tmp_path):
    save_tiny_model("llama", tmp_path, max_position_embeddings=128)
    runner = ModelRunner(load_model_dir(tmp_path), 8, 4)
    anchors = decode_step_anchors(runner, (1, 16, 16), repeats=1)
    assert [b for b, _ in anchors] == [1, 16]
    assert all(0 < s < 5 for _, s in anchors)
