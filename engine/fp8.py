"""FP8 checkpoints: reading Hugging Face FP8 weights, and the FP8 kind of linear layer.

Layouts read (weights `float8_e4m3fn` [N, K]; dequantized W = q * s, elementwise):

  * `quant_method: fp8` without `weight_block_size` (AutoFP8 style): a per-tensor
    `weight_scale` (one fp32), optionally a static per-tensor `input_scale`.
  * `quant_method: fp8` with `weight_block_size: [bn, bk]` (Qwen3-FP8, DeepSeek):
    `weight_scale_inv` [ceil(N / bn), ceil(K / bk)], W[i, j] = q[i, j] * s[i // bn, j // bk]
    (despite its name the scale multiplies).
  * `quant_method: compressed-tensors` with float 8-bit weights: `weight_scale` of
    strategy tensor ([1]), channel ([N, 1]) or block ([ceil(N / bn), ceil(K / bk)]).

Which projections are FP8 is read from the tensors themselves (a weight with a scale
beside it), so `ignore` / `modules_to_not_convert` lists need no parsing. Static
`input_scale`s are ignored: activations are quantized dynamically per token (per
token and 128-group for block weights), which is at least as accurate.

In memory every FP8 weight is an `Fp8Weight`: the fp8 tensor and an fp32 scale grid
`scale[i // group_n, j // group_k]`. A per-tensor scale becomes a per-row one
(group (1, K)), so the fused projections (q|k|v, gate|up) stay exact: their parts
keep their own scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .kernels.fp8_gemm import FP8_DTYPE, fp8_gemv, fp8_matmul

_METHODS = ("fp8", "compressed-tensors")


class Fp8FormatError(ValueError):
    """A quantization_config or FP8 tensor set the engine cannot read."""


@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 weight [N, K] and its fp32 scales [ceil(N / group_n), ceil(K / group_k)]."""

    weight: torch.Tensor
    scale: torch.Tensor
    group_n: int
    group_k: int

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def is_per_row(self) -> bool:
        """One scale per output row (per-tensor and per-channel checkpoints): `torch._scaled_mm`'s rowwise case."""
        return self.group_n == 1 and self.group_k >= self.weight.shape[1]

    def to(self, device: torch.device) -> Fp8Weight:
        return Fp8Weight(self.weight.to(device).contiguous(), self.scale.to(device, torch.float32).contiguous(),
                         self.group_n, self.group_k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = q * s, computed in fp32 and rounded to `dtype` once."""
        n, k = self.weight.shape
        scale = self.scale.float().repeat_interleave(self.group_n, 0)[:n].repeat_interleave(self.group_k, 1)[:, :k]
        return (self.weight.float() * scale).to(dtype)

    def per_row_groups(self) -> Fp8Weight:
        """The same values with one scale row per weight row (so any row split or concat stays exact)."""
        if self.group_n == 1:
            return self
        n = self.weight.shape[0]
        return Fp8Weight(self.weight, self.scale.repeat_interleave(self.group_n, 0)[:n], 1, self.group_k)

    @staticmethod
    def cat(parts: list[Fp8Weight]) -> Fp8Weight:
        """Row-wise concatenation (q|k|v, gate|up); scale blocks are kept where every part fills whole blocks."""
        group_k = {p.group_k for p in parts}
        if len(group_k) != 1 or len({p.weight.shape[1] for p in parts}) != 1:
            raise Fp8FormatError("fused FP8 projections must share K and the K grouping of their scales")
        group_n = parts[0].group_n
        if any(p.group_n != group_n or p.weight.shape[0] % group_n for p in parts):
            parts = [p.per_row_groups() for p in parts]
            group_n = 1
        return Fp8Weight(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]),
                         group_n, group_k.pop())


def is_fp8_checkpoint(hf_config: Any) -> bool:
    """Whether the config names an FP8 quantization this module reads (others are refused)."""
    quant = _quantization_config(hf_config)
    if quant is None:
        return False
    method = quant.get("quant_method")
    if method not in _METHODS:
        raise Fp8FormatError(f"quantization method {method!r} is not supported; supported: {list(_METHODS)}")
    if method == "compressed-tensors":
        _check_compressed_tensors(quant)
    elif quant.get("fmt", "e4m3") != "e4m3":
        raise Fp8FormatError(f"FP8 format {quant.get('fmt')!r} is not supported (only e4m3)")
    return True


def read_fp8_weight(tensors: dict[str, torch.Tensor], name: str) -> Fp8Weight | None:
    """The FP8 weight `name` (e.g. 'model.layers.0.mlp.down_proj.weight') with its scales, or None if dense."""
    weight = tensors.get(name)
    stem = name.removesuffix("weight")
    block_scale = tensors.get(stem + "weight_scale_inv")
    scale = block_scale if block_scale is not None else tensors.get(stem + "weight_scale")
    if weight is None or scale is None:
        return None
    if weight.dtype != FP8_DTYPE:
        raise Fp8FormatError(f"{name}: has a scale but dtype {weight.dtype}; only float8_e4m3fn weights are read")
    n, k = weight.shape
    scale = scale.float()
    if scale.numel() == 1:  # per tensor
        return Fp8Weight(weight, scale.reshape(1, 1).expand(n, 1).contiguous(), 1, k)
    if scale.dim() == 2 and scale.shape == (n, 1):  # per channel
        return Fp8Weight(weight, scale, 1, k)
    if scale.dim() == 2:  # blocks: the block size follows from the grid
        group_n, group_k = _block_size(n, k, tuple(scale.shape))
        if group_n is not None:
            return Fp8Weight(weight, scale, group_n, group_k)
    raise Fp8FormatError(f"{name}: scale of shape {tuple(scale.shape)} fits no FP8 layout for a [{n}, {k}] weight")


def _block_size(n: int, k: int, grid: tuple[int, int]) -> tuple[int | None, int]:
    """The (bn, bk) with grid == (ceil(n / bn), ceil(k / bk)), preferring the common 128 x 128."""
    for size in (128, 64, 32, 16, 256):
        if (-(-n // size), -(-k // size)) == grid:
            return size, size
    if n % grid[0] == 0 and k % grid[1] == 0:
        return n // grid[0], k // grid[1]
    return None, 0


def _quantization_config(hf_config: Any) -> dict[str, Any] | None:
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return None
    return quant if isinstance(quant, dict) else quant.to_dict()


def _check_compressed_tensors(quant: dict[str, Any]) -> None:
    for name, group in (quant.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise Fp8FormatError(
                f"compressed-tensors group {name!r}: only float 8-bit weights are supported, got "
                f"type {weights.get('type')!r} with {weights.get('num_bits')} bits"
            )
        if weights.get("strategy", "tensor") not in ("tensor", "channel", "block"):
            raise Fp8FormatError(f"compressed-tensors group {name!r}: strategy {weights['strategy']!r} is not supported")


class Fp8Linear:
    """y = x @ W.T (+ b) with W an `Fp8Weight`, on the FP8 kernels (engine/kernels/fp8_gemm.py)."""

    def __init__(self, weight: Fp8Weight, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor, use_gemv: bool = False) -> torch.Tensor:
        """`use_gemv`: a decode step of few rows, where the weight-only GEMV streams W fastest."""
        w = self.weight
        if use_gemv:
            return fp8_gemv(x, w.weight, w.scale, w.group_n, w.group_k, self.bias)
        return fp8_matmul(x, w.weight, w.scale, w.group_n, w.group_k, self.bias)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight (the CPU path and references)."""
        return self.weight.dequantize(dtype)


def dense_linear(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: F.linear on the dequantized weight, in x's dtype."""
    return F.linear(x, weight.dequantize(x.dtype), bias)
