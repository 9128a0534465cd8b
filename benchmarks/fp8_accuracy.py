"""How far the FP8 engine is from exact, beside how far the bf16 engine is (for fp8_speed.py).

Random 8B-shape weights give near-flat logits and a deep random network amplifies any rounding,
so an error against transformers in bf16 says little alone. Three measures that do:

  * per GEMM (the first layer's projections): y against float64 on the dequantized weight, for
    the FP8 weight-only GEMV (expected: bf16 rounding, as the bf16 GEMV on the same values), and
    the FP8 GEMM that quantizes the activation (expected: e4m3's ~2-4% per product);
  * the model, teacher-forced on fixed tokens (512-token prompt, 16 decode steps), against
    transformers in fp32 on the dequantized weights: transformers bf16, the bf16 engine and the
    FP8 engine side by side (the FP8 prefill quantizes activations, so its error is the GEMM's,
    amplified as much as the bf16 engines' rounding is);
  * decode only, on the same KV (the bf16 engine's prefill copied into the FP8 engine's cache):
    FP8 engine (weight-only GEMV) vs bf16 engine, beside bf16 engine GEMV vs bf16 engine cuBLAS
    (the noise of merely another bf16 kernel): the two should be of one size.
"""
from __future__ import annotations

import torch

from engine_timing import rel_err
from pdserve.engine import linear as engine_linear
from pdserve.engine.kernels.fp8_gemm import fp8_matmul
from pdserve.engine.kernels.fp8_gemv import fp8_gemv_triton
from pdserve.engine.kernels.gemv import gemv
from pdserve.engine.runner import DecodeInput, ModelRunner, PrefillChunk

PROMPT, STEPS, BLOCK = 512, 16, 16


def gemm_errors(loaded) -> dict:
    """Relative error of each decode/prefill GEMM path against float64 on the first layer's FP8 weights."""
    layer = loaded.weights.layers[0]
    device = loaded.device
    gen = torch.Generator(device=device).manual_seed(3)
    out = {}
    for name, proj in (("qkv", layer.qkv), ("o", layer.o), ("gate_up", layer.mlp.gate_up), ("down", layer.mlp.down)):
        w = proj.weight
        exact = w.dequantize(torch.float64)
        bf16_w = w.dequantize(torch.bfloat16)
        row = out[name] = {}
        for rows in (1, 8):
            x = torch.randn(rows, w.shape[1], generator=gen, device=device).bfloat16()
            ref = x.double() @ exact.t()
            row[f"M={rows} fp8 gemv"] = rel_err(fp8_gemv_triton(x, w.weight, w.scale, w.group_n, w.group_k), ref)
            row[f"M={rows} bf16 gemv (bf16-rounded W)"] = rel_err(gemv(x, bf16_w), ref)
        x = torch.randn(64, w.shape[1], generator=gen, device=device).bfloat16()
        ref = x.double() @ exact.t()
        row["M=64 fp8 gemm (x quantized)"] = rel_err(fp8_matmul(x, w.weight, w.scale, w.group_n, w.group_k), ref)
        row["M=64 bf16 F.linear (bf16-rounded W)"] = rel_err(torch.nn.functional.linear(x, bf16_w), ref)
    return out


def tokens(vocab: int) -> list[int]:
    return torch.randint(0, vocab, (PROMPT + STEPS,), generator=torch.Generator().manual_seed(7)).tolist()


def small_runner(loaded, kv: str) -> ModelRunner:
    return ModelRunner(loaded, -(-(PROMPT + STEPS) // BLOCK) + 1, BLOCK, max_decode_batch=1, use_cuda_graphs=False,
                       kv_cache_dtype=kv)


def engine_logits(runner: ModelRunner, ids: list[int], after_prefill=None) -> torch.Tensor:
    """[1 + STEPS, vocab] fp32: the prefill's last row, then each teacher-forced decode step's."""
    table = tuple(range(-(-len(ids) // BLOCK)))
    with torch.inference_mode():
        rows = [runner.prefill([PrefillChunk(tuple(ids[:PROMPT]), 0, table)])[0].float()]
        if after_prefill is not None:
            after_prefill(runner)
        for i in range(STEPS):  # step i feeds token PROMPT + i at position PROMPT + i
            rows.append(runner.decode([DecodeInput(ids[PROMPT + i], PROMPT + i, table)])[0].float())
    return torch.stack(rows)


def decode_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """The STEPS decode rows alone, on whatever the cache holds for the prompt."""
    table = tuple(range(-(-len(ids) // BLOCK)))
    with torch.inference_mode():
        return torch.stack([runner.decode([DecodeInput(ids[PROMPT + i], PROMPT + i, table)])[0].float()
                            for i in range(STEPS)])


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """transformers' rows at the same positions: the prompt's last token, then each fed token."""
    with torch.inference_mode():
        return hf(torch.tensor([ids], device=hf.device), logits_to_keep=STEPS + 1).logits[0].float()[:STEPS + 1]


def summary(rows: torch.Tensor, ref: torch.Tensor) -> dict:
    errors = [rel_err(a, b) for a, b in zip(rows, ref)]
    top1 = sum(int(a.argmax() == b.argmax()) for a, b in zip(rows, ref))
    return dict(prefill=round(errors[0], 4), decode_max=round(max(errors[1:]), 4), top1=f"{top1}/{len(errors)}")


def model_errors(hf, bf16_loaded, fp8_loaded) -> dict:
    """Errors against transformers fp32 (teacher-forced) and decode on the same KV; see the module docstring."""
    full = tokens(fp8_loaded.spec.vocab_size)  # the prompt, then the STEPS tokens fed to decode
    hf.float()
    ref32 = hf_logits(hf, full)
    hf.bfloat16()
    torch.cuda.empty_cache()
    out = {"vs transformers fp32": {}, "decode on the same KV": {}}
    vs = out["vs transformers fp32"]
    vs["transformers bf16"] = summary(hf_logits(hf, full), ref32)
    saved = {}

    def keep_cache(runner):
        saved["kv"] = runner.kv_cache.tensor.clone()

    bf16_runner = small_runner(bf16_loaded, "auto")
    gemv_rows = engine_logits(bf16_runner, full, keep_cache)
    vs["bf16 engine"] = summary(gemv_rows, ref32)
    for kv in ("auto", "fp8_e4m3"):
        vs[f"fp8 engine, KV {'bf16' if kv == 'auto' else kv}"] = summary(engine_logits(small_runner(fp8_loaded, kv), full), ref32)
    same = out["decode on the same KV"]
    previous, engine_linear.GEMV_MAX_ROWS = engine_linear.GEMV_MAX_ROWS, 0
    try:
        bf16_runner.kv_cache.tensor.copy_(saved["kv"])
        cublas_rows = decode_logits(bf16_runner, full)
    finally:
        engine_linear.GEMV_MAX_ROWS = previous
    fp8_runner = small_runner(fp8_loaded, "auto")
    fp8_runner.kv_cache.tensor.copy_(saved["kv"])
    fp8_rows = decode_logits(fp8_runner, full)
    same["bf16 engine GEMV vs bf16 engine cuBLAS (bf16 kernel noise)"] = summary(
        torch.cat([gemv_rows[:1], cublas_rows]), gemv_rows)
    same["fp8 engine weight-only GEMV vs bf16 engine GEMV"] = summary(torch.cat([gemv_rows[:1], fp8_rows]), gemv_rows)
    return out
