"""How close a replica runs to its GPU's limits: MFU for prefill, MBU for decode; the engine's own step times.

The two ceilings are measured once when a replica starts (a bf16 matmul and a
device-to-device copy, a few milliseconds), not taken from a datasheet. On the
CPU there is no meaningful peak, and `Roofline.measure` returns None.

`decode_step_anchors` times the engine's own decode step at a few batch sizes at
start (scratch rows in block 0, short context: what the step costs when nothing
else runs), on the CPU too; the step-time model that `pdserve diagnose` fits from a
run's measured points is anchored by them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .model_spec import ModelSpec
from .runner import DecodeInput, ModelRunner
from .sampler import SamplingParams


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
        """Achieved linear-layer FLOP/s (2 per parameter per token) over the matmul rate."""
        return 2 * spec.num_params * tokens_per_s / self.matmul_flops_per_s

    def decode_mbu(self, weight_bytes: int, kv_bytes_read: int, step_time_s: float) -> float:
        """Bytes one decode step must read (weights once, the batch's KV) per second over the copy rate."""
        if step_time_s <= 0:
            return 0.0
        return (weight_bytes + kv_bytes_read) / step_time_s / self.copy_bytes_per_s


def decode_step_anchors(runner: ModelRunner, batch_sizes: tuple[int, ...], repeats: int = 3) -> list[tuple[int, float]]:
    """(batch size, seconds) of the engine's decode step and sampling, back to back, before the replica serves.

    Every row writes its K/V into block 0 (free at start; a sequence writes every slot
    it later reads), so the pool's blocks need not be allocated."""
    position = min(runner.block_size, runner.spec.max_model_len) - 1
    anchors = []
    for batch in sorted(set(b for b in batch_sizes if b > 0)):
        inputs = [DecodeInput(0, position, (0,))] * batch
        params = [SamplingParams()] * batch
        step = lambda: runner.decode_and_sample(inputs, params).result()  # noqa: E731
        anchors.append((batch, _timed(step, runner.device, repeats)))
    return anchors


def _timed(work, device: torch.device, repeats: int = 10) -> float:
    work()
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    _synchronize(device)
    return (time.perf_counter() - started) / repeats


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
