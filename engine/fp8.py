"""FP8 checkpoints: reading Hugging Face FP8 weights, and the FP8 kind of linear layer.

Layouts read (weights `float8_e4m3fn` [N, K]; dequantized W = q * s, elementwise):

  * `quant_method: fp8` without `weight_block_size` (AutoFP8 style): a per-tensor
    `weight_scale` (one fp32), optionally a static per-tensor `input_scale`.
  * `quant_method: fp8` with `weight_block_size: [bn, bk]` (Qwen3-FP8, DeepSeek):
    `weight_scale_inv` [ceil(N / bn), ceil(K / bk)], W[i, j] = q[i, j] * s[i // bn, j // bk]
    (despite its name the scale multiplies).
  * `quant_method: compressed-tensors` with float 8-bit weights: `weight_scale` of
    strategy tensor ([1]), channel ([N, 1]) or block ([ceil(N / bn), ceil(K / bk)]).

KV cache scales (used by `kv_cache.dtype: fp8_e4m3`, engine/kv_cache.py: stored = K / k_scale)
come from the checkpoint where it ships them: `self_attn.k_scale` / `v_scale` (llm-compressor,
Qwen and vLLM-style FP8 checkpoints), `self_attn.k_proj.output_scale` / `v_proj.output_scale`
(older compressed-tensors) or one `self_attn.kv_scale` for both (AutoFP8). A per-head scale is
read as its largest (the cache keeps one per tensor; the largest clips nothing).

Which projections are FP8 is read from the tensors themselves (a weight with a scale
beside it), so `ignore` / `modules_to_not_convert` lists need no parsing. Activations of
the FP8 GEMM are quantized dynamically per token (and 128-group for block weights), unless
the checkpoint says static (`activation_scheme: static`, or compressed-tensors
`input_activations` with `dynamic: false`) and ships `input_scale`s: then x / input_scale,
one scale per tensor (the largest of a fused projection's parts, which clips none of them).

In memory every FP8 weight is an `Fp8Weight`: the fp8 tensor and an fp32 scale grid
`scale[i // group_n, j // group_k]`. A per-tensor scale becomes a per-row one
(group (1, K)), so the fused projections (q|k|v, gate|up) stay exact: their parts
keep their own scales. A tensor-parallel rank reads only its shard of each weight
and cuts the scales to match (`_shard`): block scales stay blocks where the cut
falls on a block boundary; a cut through a block's rows gives per-row scales; a cut
through a block's columns is refused with the TP sizes that would do.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch

from . import linear
from .kernels.fp8_gemm import FP8_DTYPE, dequantize, fp8_matmul
from .kernels.fp8_gemv import fp8_gemv
from .linear import Linear

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
    input_scale: torch.Tensor | None = None  # [1] fp32: a static activation scale; None: dynamic

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def to(self, device: torch.device) -> Fp8Weight:
        input_scale = None if self.input_scale is None else self.input_scale.to(device, torch.float32)
        return Fp8Weight(self.weight.to(device).contiguous(), self.scale.to(device, torch.float32).contiguous(),
                         self.group_n, self.group_k, input_scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = q * s, computed in fp32 and rounded to `dtype` once."""
        return dequantize(self.weight, self.scale, self.group_n, self.group_k).to(dtype)

    def per_row_groups(self) -> Fp8Weight:
        """The same values with one scale row per weight row (so any row split or concat stays exact)."""
        if self.group_n == 1:
            return self
        n = self.weight.shape[0]
        return Fp8Weight(self.weight, self.scale.repeat_interleave(self.group_n, 0)[:n], 1, self.group_k,
                         self.input_scale)

    @staticmethod
    def cat(parts: list[Fp8Weight]) -> Fp8Weight:
        """Row-wise concatenation (q|k|v, gate|up); scale blocks are kept where every part fills whole blocks."""
        if len(parts) == 1:
            return parts[0]
        group_k = {p.group_k for p in parts}
        if len(group_k) != 1 or len({p.weight.shape[1] for p in parts}) != 1:
            raise Fp8FormatError("fused FP8 projections must share K and the K grouping of their scales")
        group_n = parts[0].group_n
        if any(p.group_n != group_n or p.weight.shape[0] % group_n for p in parts):
            parts = [p.per_row_groups() for p in parts]
            group_n = 1
        static = [p.input_scale for p in parts]
        input_scale = None if any(s is None for s in static) else torch.stack(static).amax(0)
        return Fp8Weight(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]),
                         group_n, group_k.pop(), input_scale)


@dataclass(frozen=True)
class Fp8Checkpoint:
    """How a checkpoint lays out its FP8 weights, from its quantization_config."""

    block_size: tuple[int, int] | None  # (bn, bk) of block scales; None: per-tensor or per-channel scales
    static_activations: bool = False  # the checkpoint's input_scales quantize the activations

    @staticmethod
    def of(hf_config: Any) -> Fp8Checkpoint | None:
        """None for an unquantized checkpoint; raises `Fp8FormatError` for a quantization this module cannot read."""
        quant = getattr(hf_config, "quantization_config", None)
        if quant is None:
            return None
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        method = quant.get("quant_method")
        if method == "fp8":
            if quant.get("fmt", "e4m3") != "e4m3":
                raise Fp8FormatError(f"FP8 format {quant.get('fmt')!r} is not supported (only e4m3)")
            return Fp8Checkpoint(_pair(quant.get("weight_block_size")), quant.get("activation_scheme") == "static")
        if method == "compressed-tensors":
            return Fp8Checkpoint(_compressed_tensors_block(quant), _compressed_tensors_static(quant))
        raise Fp8FormatError(f"quantization method {method!r} is not supported; supported: {list(_METHODS)}")

    def weight(self, tensors: Any, name: str, rows: slice | None = None,
               columns: slice | None = None) -> Fp8Weight | None:
        """The FP8 weight `name` (e.g. 'model.layers.0.mlp.down_proj.weight') with its scales, or None if dense.

        `rows`, `columns`: a tensor-parallel rank's shard (engine/sharding.py); only that part of the
        weight is read (`tensors` a WeightReader, or a plain dict), its scales cut to match."""
        stem = name.removesuffix("weight")
        scale = tensors.get(stem + "weight_scale_inv")
        scale = scale if scale is not None else tensors.get(stem + "weight_scale")
        if name not in tensors or scale is None:
            return None
        weight = _read(tensors, name, rows, columns)
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise Fp8FormatError(f"{name}: has a scale but is {weight.dtype} {tuple(weight.shape)}; "
                                 "only 2-d float8_e4m3fn weights are read")
        n, k = _shape(tensors, name)
        static = tensors.get(stem + "input_scale") if self.static_activations else None
        static = None if static is None else static.float().reshape(-1).amax().reshape(1)
        grid, group_n, group_k = self._scale_grid(name, scale.float(), n, k)
        rows, columns = rows or slice(0, n), columns or slice(0, k)
        return _shard(name, weight, grid, group_n, group_k, range(n)[rows], range(k)[columns], n, k, static)

    def _scale_grid(self, name: str, scale: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, int, int]:
        """The whole weight's scales as a grid [ceil(n / group_n), ceil(k / group_k)] and its groups."""
        if scale.numel() == 1:  # per tensor: one scale per row, so row splits and concats stay exact
            return scale.reshape(1, 1).expand(n, 1), 1, k
        if tuple(scale.shape) == (n, 1):  # per channel
            return scale, 1, k
        if self.block_size is not None:
            bn, bk = self.block_size
            if tuple(scale.shape) == (-(-n // bn), -(-k // bk)):
                return scale, bn, bk
        raise Fp8FormatError(f"{name}: scale of shape {tuple(scale.shape)} fits no FP8 layout for a [{n}, {k}] "
                             f"weight (block size {self.block_size})")

    def dequantized(self, tensors: Any, name: str, rows: slice | None = None, columns: slice | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
        """Checkpoint tensor `name` (its `rows` and `columns`), dequantized to fp32 (on `device`, moved there
        as FP8: a quarter of the bytes, and the GPU's arithmetic) when it is an FP8 weight with scales; else
        as it is stored."""
        quantized = self.weight(tensors, name, rows, columns)
        if quantized is None:
            return _read(tensors, name, rows, columns)
        return (quantized if device is None else quantized.to(device)).dequantize()

    def linear(self, tensors: Any, names: list[str], bias: torch.Tensor | None, device: torch.device,
               shards: list[tuple[slice | None, slice | None]] | None = None) -> Fp8Linear | None:
        """The FP8 Linear on `device` over the row-concatenated weights `names` (q|k|v, gate|up), each cut to
        its (rows, columns) in `shards`, or None unless every one is FP8 with scales."""
        shards = shards or [(None, None)] * len(names)
        parts = [self.weight(tensors, name, *shard) for name, shard in zip(names, shards)]
        if any(p is None for p in parts):
            return None
        return Fp8Linear(Fp8Weight.cat(parts).to(device), bias)


def _read(tensors: Any, name: str, rows: slice | None, columns: slice | None) -> torch.Tensor:
    if hasattr(tensors, "read"):  # a WeightReader: only the slice leaves the file
        return tensors.read(name, rows, columns)
    whole = tensors[name]
    return whole if rows is None and columns is None else whole[rows or slice(None), columns or slice(None)]


def _shape(tensors: Any, name: str) -> tuple[int, ...]:
    return tensors.shape(name) if hasattr(tensors, "shape") else tuple(tensors[name].shape)


def _shard(name: str, weight: torch.Tensor, grid: torch.Tensor, group_n: int, group_k: int, rows: range,
           columns: range, n: int, k: int, input_scale: torch.Tensor | None) -> Fp8Weight:
    """weight[rows, columns] (already read) with its scales cut to match.

    A row cut inside a block is exact (that shard's rows get per-row scales); a column cut
    inside a block is refused: the FP8 GEMM quantizes activations in the weight's K groups.
    A static activation scale holds for any shard: a rank's input is part of the same activations."""
    if len(columns) != k:
        if group_k >= k:  # one scale across each whole row: the shard's columns share it
            group_k = len(columns)
        elif columns.start % group_k or (columns.stop != k and columns.stop % group_k):
            raise Fp8FormatError(
                f"{name}: tensor parallelism cuts its {k} input columns at {columns.start}..{columns.stop}, inside "
                f"its {group_k}-column scale blocks; use a tensor_parallel_size that splits them on multiples "
                f"of {group_k}")
        else:
            grid = grid[:, columns.start // group_k: -(-columns.stop // group_k)]
    if len(rows) != n:
        if rows.start % group_n == 0 and (rows.stop == n or rows.stop % group_n == 0):
            grid = grid[rows.start // group_n: -(-rows.stop // group_n)]
        else:  # per-row scales for this shard: exact, at 4 bytes a row
            grid = grid.repeat_interleave(group_n, 0)[rows.start:rows.stop]
            group_n = 1
    return Fp8Weight(weight, grid.contiguous(), group_n, group_k, input_scale)


_KV_SCALE_NAMES = (
    ("self_attn.k_scale", "self_attn.v_scale"),
    ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),
    ("self_attn.kv_scale", "self_attn.kv_scale"),
)


def checkpoint_kv_scales(tensors: Mapping[str, torch.Tensor], num_layers: int) -> tuple[tuple[float, float], ...] | None:
    """Each layer's (K, V) cache scale from the checkpoint; None when it ships none."""
    scales = []
    for i in range(num_layers):
        p = f"model.layers.{i}."
        names = next(((p + k, p + v) for k, v in _KV_SCALE_NAMES if p + k in tensors and p + v in tensors), None)
        scales.append(None if names is None else tuple(_kv_scale(tensors[n], n) for n in names))
    if all(s is None for s in scales):
        return None
    if any(s is None for s in scales):
        missing = [i for i, s in enumerate(scales) if s is None]
        raise Fp8FormatError(f"the checkpoint has KV cache scales for some layers only (none for layers {missing[:8]})")
    return tuple(scales)


def _kv_scale(t: torch.Tensor, name: str) -> float:
    value = float(t.float().max())
    if not value > 0 or value == float("inf"):
        raise Fp8FormatError(f"{name}: a KV cache scale must be positive and finite, got {value}")
    return value


def _compressed_tensors_static(quant: dict[str, Any]) -> bool:
    """Whether a compressed-tensors config quantizes activations with static (checkpoint) scales."""
    inputs = [g.get("input_activations") for g in (quant.get("config_groups") or {}).values()]
    return any(i is not None and i.get("dynamic") is False for i in inputs)


def _pair(block: Any) -> tuple[int, int] | None:
    if block is None:
        return None
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise Fp8FormatError(f"weight block size {block!r}: expected two positive integers")
    return int(block[0]), int(block[1])


def _compressed_tensors_block(quant: dict[str, Any]) -> tuple[int, int] | None:
    """The block size of a compressed-tensors FP8 config (None without block scales); refuses other schemes."""
    blocks = set()
    for name, group in (quant.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise Fp8FormatError(
                f"compressed-tensors group {name!r}: only float 8-bit weights are supported, got "
                f"type {weights.get('type')!r} with {weights.get('num_bits')} bits"
            )
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "block"):
            raise Fp8FormatError(f"compressed-tensors group {name!r}: strategy {strategy!r} is not supported")
        if strategy == "block":
            blocks.add(_pair(weights.get("block_structure")))
    if len(blocks) > 1:
        raise Fp8FormatError(f"compressed-tensors: several block sizes {sorted(blocks)}")
    return blocks.pop() if blocks else None


@dataclass(frozen=True, eq=False)
class Fp8Linear(Linear):
    """y = x @ W.T (+ b) with W an `Fp8Weight`, on the FP8 kernels (engine/kernels/fp8_gemm.py).

    Like the dense Linear, at most `GEMV_MAX_ROWS` rows on CUDA (decode steps of few
    sequences) take the GEMV, here weight-only (the activation stays bf16); more rows
    quantize the activation and take the FP8 GEMM."""

    weight: Fp8Weight
    bias: torch.Tensor | None = None  # [N], the compute dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.is_cuda and x.shape[0] <= linear.GEMV_MAX_ROWS:
            return fp8_gemv(x, w.weight, w.scale, w.group_n, w.group_k, self.bias)
        return fp8_matmul(x, w.weight, w.scale, w.group_n, w.group_k, self.bias, w.input_scale)
