"""Kernel tests: interpreter fixes and the device applied on import (kernel_target), outputs poisoned."""
import importlib

import pytest
import torch

importlib.import_module("kernel_target")  # patches triton's interpreter before any test runs a kernel


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    """Floating tensors from torch.empty / empty_like start as NaN, so an output element
    (or a partial result read back) that a kernel never wrote shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poisoned(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poisoned(empty_like(*args, **kwargs)))
