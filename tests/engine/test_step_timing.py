"""The step clock: device busy time beside the loop's period, and the engine's own step times at start."""
import time

import pytest
import torch

from pdserve.engine.loader import load_model_dir
from pdserve.engine.roofline import decode_step_anchors
from pdserve.engine.runner import ModelRunner
from pdserve.engine.step_timing import StepClock
from tiny_models import save_tiny_model


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


def test_the_engines_own_decode_steps_are_timed_at_start(tmp_path):
    save_tiny_model("llama", tmp_path, max_position_embeddings=128)
    runner = ModelRunner(load_model_dir(tmp_path), 8, 4)
    anchors = decode_step_anchors(runner, (1, 16, 16), repeats=1)
    assert [b for b, _ in anchors] == [1, 16]
    assert all(0 < s < 5 for _, s in anchors)
