"""Copies between the host and the device that never wait for the stream.

A copy from pageable host memory (`torch.tensor(..., device="cuda")`, `.to("cuda")`)
waits for everything already queued on the stream, so a step's small inputs would
wait for the step in flight before them. These go through pinned memory,
asynchronously, ordered on the stream like kernels. On the CPU they are plain tensors.
"""
from __future__ import annotations

import torch


def on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list (step inputs: ids, lengths, offsets) on the device."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)


def to_host(values: torch.Tensor) -> torch.Tensor:
    """A device tensor's values in pinned host memory, once the stream reaches the copy (a CPU tensor as it is)."""
    if not values.is_cuda:
        return values
    return torch.empty(values.shape, dtype=values.dtype, pin_memory=True).copy_(values, non_blocking=True)
