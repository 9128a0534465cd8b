"""RMSNorm, alone and fused with the residual add that precedes it in a Llama block.

Shapes:

    x         [..., hidden]   bf16/fp16/fp32, hidden contiguous
    residual  [..., hidden]   same shape and dtype as x, contiguous
    weight    [hidden]

Numerics follow transformers' LlamaRMSNorm exactly, roundings included:

    h = x.float();  h = h * rsqrt(mean(h²) + eps);  out = weight * h.to(x.dtype)

and its residual add `residual + x` is rounded to x's dtype before the norm
reads it. Output is in x's dtype. GPU path: one program per row, the whole
row in registers (hidden up to 16k or so).
"""
import torch

from pdserve.engine.kernels._triton import tl, triton, use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (in place), then (rms_norm(residual), residual)."""
    if use_triton(x, residual, weight):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * hidden.to(x.dtype)).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual += x
    return rms_norm_reference(residual, weight, eps), residual


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])  # [T, hidden]
    out = torch.empty_like(rows)
    _launch(rows, None, weight, out, eps)
    return out.view(x.shape)


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    assert residual.is_contiguous(), "residual is updated in place"
    assert x.shape == residual.shape and x.dtype == residual.dtype
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    _launch(rows, residual.view(rows.shape), weight, out, eps)
    return out.view(x.shape), residual


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float
) -> None:
    num_rows, hidden = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous()
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x, residual, weight, out, eps, hidden,
        x.stride(0), out.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),  # ~8 elements a thread
    )


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, hidden]
    residual_ptr,  # [T, hidden] contiguous, updated in place; unused without HAS_RESIDUAL
    weight_ptr,  # [hidden]
    out_ptr,  # [T, hidden]
    eps,
    hidden,
    stride_x,
    stride_out,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # rounded to the activation dtype, as the unfused `residual + x` would be
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + row * hidden + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, 0) / hidden + eps)
    # LlamaRMSNorm rounds the normalised row to the input dtype before the weight multiply
    normed = (h * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)
