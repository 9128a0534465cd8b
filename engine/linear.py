"""The projections of the model: `y = x @ W.T (+ b)`, whatever W is stored as.

The model only calls `proj(x)`. A `Linear` hides how its weight is held (a dense
tensor in the compute dtype here; FP8 with scales in engine/fp8.py) and which
kernel multiplies: on CUDA, inputs of at most `GEMV_MAX_ROWS` rows (decode steps
of few sequences) go through the Triton GEMV (engine/kernels/gemv.py), which
streams a weight faster than cuBLAS at one row; more rows and the CPU use
F.linear. Sharding is decided at load time: a shard is just a smaller Linear.

    Linear.dense(weight [N, K], bias [N] | None)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels.gemv import gemv

# At most this many rows on CUDA run through the Triton GEMV (the crossover with cuBLAS measured on
# an H100); 0 turns it off. Read at each call: a replica sets it from `engine.gemv_max_rows`, and
# benchmarks/gemv_study.py compares on and off in one run.
GEMV_MAX_ROWS = 8


def set_gemv_max_rows(rows: int) -> None:
    """Projections of at most `rows` rows take the GEMV on CUDA, in this whole process; 0: never."""
    global GEMV_MAX_ROWS
    if rows < 0:
        raise ValueError(f"gemv_max_rows must be >= 0, got {rows}")
    GEMV_MAX_ROWS = rows


class Linear:
    """A projection `y = x @ W.T (+ b)`; subclasses hold `weight` (shape [N, K]) in their own format."""

    weight: torch.Tensor | object

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in_features] -> [M, out_features] in x's dtype."""
        raise NotImplementedError

    @staticmethod
    def dense(weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Linear":
        """A weight [N, K] in the compute dtype (the nn.Linear layout)."""
        return DenseLinear(weight, bias)


@dataclass(frozen=True, eq=False)
class DenseLinear(Linear):
    weight: torch.Tensor  # [N, K], contiguous
    bias: torch.Tensor | None = None  # [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.shape[0] <= GEMV_MAX_ROWS:
            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
