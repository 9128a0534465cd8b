"""RMSNorm, alone, fused with the residual add that precedes it, or over each head in place.

Shapes:

    x         [..., hidden]   bf16/fp16/fp32, hidden contiguous
    residual  [..., hidden]   same shape and dtype as x, contiguous
    weight    [hidden]
    offset    0.0 (Llama) or 1.0 (Gemma): the row is multiplied by (offset + weight)

Numerics follow transformers exactly, roundings included. offset 0, LlamaRMSNorm:

    h = x.float();  h = h * rsqrt(mean(h²) + eps);  out = weight * h.to(x.dtype)

offset != 0, Gemma3RMSNorm: `out = (h * (offset + weight.float())).to(x.dtype)`
(no rounding before the multiply). The residual add `residual + x` is rounded to
x's dtype before the norm reads it. Output is in x's dtype.

`rms_norm_heads_` normalises x [T, heads, head_dim] per head in place (Qwen3's
and Gemma 3's q/k norms), on a strided view such as q inside the fused qkv.
GPU path: one program per row (or head), the whole row in registers.
"""
import torch

from pdserve.engine.kernels._triton import tl, triton, use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    if use_triton(x, weight):
        return rms_norm_triton(x, weight, eps, offset)
    return rms_norm_reference(x, weight, eps, offset)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (in place), then (rms_norm(residual), residual)."""
    if use_triton(x, residual, weight):
        return add_rms_norm_triton(x, residual, weight, eps, offset)
    return add_rms_norm_reference(x, residual, weight, eps, offset)


def rms_norm_heads_(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> None:
    """x [T, heads, head_dim] ← rms_norm of each head, in place."""
    if use_triton(x, weight):
        rms_norm_heads_triton_(x, weight, eps, offset)
    else:
        x.copy_(rms_norm_reference(x, weight, eps, offset))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (hidden * (offset + weight.float())).to(x.dtype)
    return (weight * hidden.to(x.dtype)).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    residual += x
    return rms_norm_reference(residual, weight, eps, offset), residual


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])  # [T, hidden]
    out = torch.empty_like(rows)
    _launch(rows, None, weight, out, eps, offset)
    return out.view(x.shape)


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    assert residual.is_contiguous(), "residual is updated in place"
    assert x.shape == residual.shape and x.dtype == residual.dtype
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    _launch(rows, residual.view(rows.shape), weight, out, eps, offset)
    return out.view(x.shape), residual


def rms_norm_heads_triton_(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> None:
    num_tokens, num_heads, head_dim = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous()
    block = triton.next_power_of_2(head_dim)
    _rms_norm_kernel[(num_tokens * num_heads,)](
        x, None, weight, x, eps, offset, head_dim,
        x.stride(0), x.stride(0), x.stride(1), num_heads,
        HAS_RESIDUAL=False,
        GEMMA_ROUNDING=offset != 0.0,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float,
    offset: float,
) -> None:
    num_rows, hidden = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous()
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x, residual, weight, out, eps, offset, hidden,
        x.stride(0), out.stride(0), 0, 1,
        HAS_RESIDUAL=residual is not None,
        GEMMA_ROUNDING=offset != 0.0,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),  # ~8 elements a thread
    )


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, heads, hidden] (heads == 1: rows of [T, hidden])
    residual_ptr,  # [T, hidden] contiguous, updated in place; unused without HAS_RESIDUAL
    weight_ptr,  # [hidden]
    out_ptr,  # [T, heads, hidden] (may be x itself: in place)
    eps,
    offset,  # the weight multiplier is (offset + weight)
    hidden,
    stride_t,  # x's rows
    stride_out_t,  # out's rows
    stride_h,  # x's and out's heads
    heads,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA_ROUNDING: tl.constexpr,  # offset != 0: no rounding to x's dtype before the weight multiply
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    row = program // heads
    head = (program % heads) * stride_h
    start = row * stride_t + head
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + start + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # rounded to the activation dtype, as the unfused `residual + x` would be
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + row * hidden + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, 0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA_ROUNDING:
        result = h * rstd * (offset + w)
    else:
        # LlamaRMSNorm rounds the normalised row to the input dtype before the weight multiply
        result = (h * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out_t + head + cols, result.to(out_ptr.dtype.element_ty), mask=mask)
