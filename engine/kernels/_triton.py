"""Triton if installed, else a stand-in so the kernel modules still import.

CPU-only installs have no triton (it comes with the CUDA builds of torch), yet
every kernel module defines its `@triton.jit` functions at import time. The
stand-in makes those decorators no-ops; `HAS_TRITON` is False and the
dispatchers never launch anything, so only the torch references run.

    from pdserve.engine.kernels._triton import HAS_TRITON, tl, triton
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install
    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn, next_power_of_2=None, cdiv=None)
    tl = SimpleNamespace(constexpr=None)  # read only in kernel annotations


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the dispatchers launch the Triton kernel: triton present, all tensors on CUDA."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)
