"""Where the engine tests run, from the environment (default: the CPU in float32).

    PDSERVE_TEST_DEVICE=cuda PDSERVE_TEST_DTYPE=bfloat16 pytest tests/engine

The transformers reference always runs on the CPU in float32 (the oracle). In
float32 the engine must match it to rounding and give the same greedy tokens; in
bfloat16 the logits must agree to bfloat16's precision (relative L2 error) and the
greedy tokens may part ways only at a near tie of the reference's logits.
"""
import os

import torch

DEVICE = torch.device(os.environ.get("PDSERVE_TEST_DEVICE", "cpu"))
DTYPE_NAME = os.environ.get("PDSERVE_TEST_DTYPE", "float32")
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[DTYPE_NAME]
IS_EXACT = DTYPE == torch.float32

# ‖engine − reference‖ / ‖reference‖ of a row of logits; float32 on a GPU adds
# kernel-order rounding only.
LOGITS_REL_TOL = 2e-5 if IS_EXACT else 3e-2
# Two logits within this fraction of the row's range count as a tie for greedy choice.
NEAR_TIE = 0.0 if IS_EXACT else 0.02


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def assert_logits_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    if IS_EXACT:
        torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=1e-4, rtol=1e-4)
    else:
        assert relative_error(out, ref) < LOGITS_REL_TOL


def greedy_divergence(engine_tokens: list[int], reference_tokens: list[int], prompt: list[int], reference) -> str | None:
    """None if the engine's greedy tokens are the reference's, or part only at a near tie
    (judged on the reference's fp32 logits after the common prefix); else a message."""
    for step, (ours, theirs) in enumerate(zip(engine_tokens, reference_tokens)):
        if ours == theirs:
            continue
        if IS_EXACT:
            return f"step {step}: engine {ours}, reference {theirs}"
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + reference_tokens[:step]])).logits[0, -1].double()
        margin = (logits[theirs] - logits[ours]).item()
        spread = (logits.max() - logits.min()).item()
        if margin > NEAR_TIE * spread:
            return f"step {step}: engine {ours}, reference {theirs}, margin {margin:.4f} of spread {spread:.3f}"
        return None  # a near tie: the sequences may differ from here on
    return None if len(engine_tokens) == len(reference_tokens) else "lengths differ"
