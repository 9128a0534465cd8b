"""MFU and MBU: achieved rates over the measured ceilings."""
import torch

from pdserve.engine.model_spec import spec_from_config
from pdserve.engine.roofline import Roofline
from tiny_models import tiny_config


def test_ratios_follow_their_definitions():
    spec = spec_from_config(tiny_config("llama"))
    roofline = Roofline(matmul_flops_per_s=1e12, copy_bytes_per_s=1e9)
    assert abs(roofline.prefill_mfu(spec, 1000.0) - 2 * spec.num_params * 1000 / 1e12) < 1e-15
    assert roofline.decode_mbu(weight_bytes=6e8, kv_bytes_read=4e8, step_time_s=2.0) == 0.5


def test_no_ceiling_on_the_cpu():
    assert Roofline.measure(torch.device("cpu")) is None
