"""How close a replica runs to its GPU's limits: MFU for prefill, MBU for decode.

The two ceilings are measured once when a replica starts (a bf16 matmul and a
device-to-device copy, a few milliseconds), not taken from a datasheet. On the
CPU there is no meaningful peak, and `Roofline.measure` returns None.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .model_spec import ModelSpec


@dataclass(frozen=True)
class Roofline:
    matmul_flops_per_s: float
    copy_bytes_per_s: float  # read + write

    @classmethod
    def measure(cls, device: torch.device) -> "Roofline | None":
        if device.type != "cuda":
            return None
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        matmul_s = _timed(lambda: a @ a, device)
        big = torch.empty(256 * 2 ** 20, device=device, dtype=torch.uint8)
        copy_s = _timed(lambda: big.clone(), device)
        return cls(2 * 4096 ** 3 / matmul_s, 2 * big.numel() / copy_s)

    def prefill_mfu(self, spec: ModelSpec, tokens_per_s: float) -> float:
        """Achieved linear-layer FLOP/s (2 per parameter a token multiplies with: an MoE's top-k experts) over the matmul rate."""
        return 2 * spec.num_active_params * tokens_per_s / self.matmul_flops_per_s

    def decode_mbu(self, weight_bytes: int, kv_bytes_read: int, step_time_s: float) -> float:
        """Bytes one decode step must read (weights once, the batch's KV) per second over the copy rate."""
        if step_time_s <= 0:
            return 0.0
        return (weight_bytes + kv_bytes_read) / step_time_s / self.copy_bytes_per_s


def _timed(work, device: torch.device, repeats: int = 10) -> float:
    work()
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / repeats
