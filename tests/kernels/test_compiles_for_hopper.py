"""GPU kernels compile for sm_90 (H100/H200) down to their cubin, on any machine: the GEMV, FP8 GEMV,
FP8 GEMM and FP8 activation-quantization kernels, the attention kernels with a soft cap, and the rope
kernels storing K and V into a bf16 or FP8 KV cache.

The interpreter that runs the other kernel tests on the CPU never meets the GPU compiler: a global a
kernel may not read, or a type or layout the compiler refuses, passes there and fails on the GPU.
"""
import pytest

from kernel_target import compile_for_hopper, requires_triton

GEMV = ("pdserve.engine.kernels.gemv", "_gemv_kernel",
        {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16", "num_rows": "i32", "n": "i32",
         "k": "i32", "stride_x": "i32", "stride_out": "i32"})
FP8_GEMV = ("pdserve.engine.kernels.fp8_gemv", "_fp8_gemv_kernel",
            {"x_ptr": "*bf16", "w_ptr": "*u8", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
             "num_rows": "i32", "n": "i32", "k": "i32", "stride_x": "i32", "stride_ws": "i32", "stride_out": "i32"})
FP8_GEMM = ("pdserve.engine.kernels.fp8_gemm", "_fp8_gemm_kernel",
            {"a_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32",
             "bias_ptr": "*bf16", "out_ptr": "*bf16", "m": "i32", "n": "i32", "k": "i32", "stride_a": "i32",
             "stride_as": "i32", "stride_ws": "i32", "stride_out": "i32"})
QUANTIZE = ("pdserve.engine.kernels.fp8_gemm", "_quantize_kernel",
            {"x_ptr": "*bf16", "q_ptr": "*u8", "scale_ptr": "*fp32", "static_ptr": "*fp32", "k": "i32",
             "stride_x": "i32", "stride_q": "i32", "stride_s": "i32", "stride_sg": "i32"})
QUANTIZE_FLAGS = {"GROUP_K": 128, "BLOCK": 128, "FP8_MAX": 448.0, "MIN_SCALE": 1e-12}
GEMV_FLAGS = {"HAS_BIAS": False, "DOT_PRECISION": "tf32", "BLOCK_M": 16, "VEC": 8}
FP8_GEMV_FLAGS = {"HAS_BIAS": False, "EVEN_N": True, "EVEN_K": True, "DOT_PRECISION": "tf32", "BLOCK_M": 16,
                  "BIT_DEQUANT": False, "VEC": 16}


def strides(*names: str) -> dict[str, str]:
    return {f"stride_{n}": "i32" for n in names}


DECODE_ATTENTION = ("pdserve.engine.kernels.paged_attention", "_decode_partition_kernel",
                    {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "block_tables_ptr": "*i32",
                     "context_lens_ptr": "*i32", "out_ptr": "*fp32", "lse_ptr": "*fp32", "qk_scale": "fp32",
                     "softcap": "fp32", "v_scale": "fp32", "num_partitions": "i32", "window": "i32",
                     **strides("qb", "qh", "kvb", "kvt", "kvh", "btb", "ob", "oh", "op", "lb", "lh")})
PREFILL_ATTENTION = ("pdserve.engine.kernels.prefill_attention", "_prefill_kernel",
                     {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
                      "cu_seqlens_q_ptr": "*i32", "cu_seqlens_k_ptr": "*i32", "qk_scale": "fp32", "softcap": "fp32",
                      "window": "i32", **strides("qt", "qh", "kvt", "kvh", "ot", "oh")})
ROPE_STORE = {"v_ptr": "*bf16", "slots_ptr": "*i64", "inverse_scales_ptr": "*fp32",
              **strides("qt", "qh", "kt", "kh", "vt", "vh", "ckv", "cs", "ch")}
ROPE = ("pdserve.engine.kernels.rope", "_rope_kernel",
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "positions_ptr": "*i64", "cos_sin_ptr": "*fp32", **ROPE_STORE})
QK_NORM_ROPE = ("pdserve.engine.kernels.qk_norm_rope", "_qk_norm_rope_kernel",
                {"q_ptr": "*bf16", "k_ptr": "*bf16", "q_weight_ptr": "*bf16", "k_weight_ptr": "*bf16",
                 "positions_ptr": "*i64", "cos_sin_ptr": "*fp32", "eps": "fp32", "offset": "fp32", **ROPE_STORE})
ROPE_FLAGS = {"NUM_HEADS": 32, "NUM_KV_HEADS": 8, "HALF_DIM": 64, "STORE_KV": True, "FP8_MAX": 448.0,
              "BLOCK_H": 32, "BLOCK_D": 64}


def with_cache(kernel: tuple[str, str, dict[str, str]], cache: str) -> tuple[str, str, dict[str, str]]:
    """The rope kernel with its KV store into a cache of `cache`'s type."""
    module, name, signature = kernel
    return module, name, {**signature, "cache_ptr": cache}


CASES = {
    "decode attention, soft-capped": (*DECODE_ATTENTION, {
        "GROUP_SIZE": 4, "BLOCK_G": 16, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_SIZE": 16, "BLOCK_N": 64,
        "DOT_PRECISION": "tf32", "SOFTCAP": True}),
    "prefill attention, soft-capped": (*PREFILL_ATTENTION, {
        "GROUP_SIZE": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 64, "DOT_PRECISION": "tf32",
        "SOFTCAP": True}),
    "rope, storing K and V": (*with_cache(ROPE, "*bf16"), {**ROPE_FLAGS, "IS_FP8": False}),
    "rope, storing K and V to fp8": (*with_cache(ROPE, "*fp8e4nv"), {**ROPE_FLAGS, "IS_FP8": True}),
    "q/k norm + rope, storing K and V to fp8": (*with_cache(QK_NORM_ROPE, "*fp8e4nv"), {
        **ROPE_FLAGS, "GEMMA_ROUNDING": False, "IS_FP8": True}),
    "fp8 activation quantization": (*QUANTIZE, {**QUANTIZE_FLAGS, "STATIC": False}),
    "fp8 activation quantization, static scale": (*QUANTIZE, {**QUANTIZE_FLAGS, "STATIC": True}),
    "gemv fma": (*GEMV, {**GEMV_FLAGS, "USE_DOT": False, "BLOCK_N": 8, "BLOCK_K": 512}),
    "gemv dot": (*GEMV, {**GEMV_FLAGS, "USE_DOT": True, "BLOCK_N": 32, "BLOCK_K": 256}),
    "fp8 gemv per row": (*FP8_GEMV, {**FP8_GEMV_FLAGS, "GROUP_N": 1, "GROUP_K": 1, "SCALES": "row", "USE_DOT": False,
                                     "BLOCK_N": 4, "BLOCK_K": 1024, "SUB": 1024}),
    "fp8 gemv blocks folded": (*FP8_GEMV, {**FP8_GEMV_FLAGS, "GROUP_N": 128, "GROUP_K": 128, "SCALES": "fold",
                                           "USE_DOT": False, "BLOCK_N": 4, "BLOCK_K": 1024, "SUB": 128}),
    "fp8 gemv blocks on tensor cores": (*FP8_GEMV, {**FP8_GEMV_FLAGS, "GROUP_N": 1, "GROUP_K": 128, "SCALES": "gather",
                                                    "USE_DOT": True, "BLOCK_N": 32, "BLOCK_K": 256, "SUB": 128}),
    "fp8 gemm blocks": (*FP8_GEMM, {"GROUP_N": 128, "GROUP_K": 128, "PER_ROW": False, "HAS_BIAS": False,
                                    "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "SWIZZLE": 8}),
    "fp8 gemm per row": (*FP8_GEMM, {"GROUP_N": 1, "GROUP_K": 4096, "PER_ROW": True, "HAS_BIAS": False,
                                     "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "SWIZZLE": 8}),
}


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Every case compiled in one process (a process each cost ~7 s of start-up and imports)."""
    return compile_for_hopper(CASES)


@requires_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_kernel_compiles_for_hopper(case, compiled):
    assert "cubin" in compiled[case], compiled[case]
