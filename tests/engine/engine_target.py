"""Where the engine tests run, from the environment (default: the CPU in float32).

    PDSERVE_TEST_DEVICE=cuda PDSERVE_TEST_DTYPE=bfloat16 pytest tests/engine

The transformers reference always runs on the CPU in float32 (the oracle). In
float32 the engine must match it to rounding and give the same greedy tokens.
In a low precision the yardstick is transformers itself in that precision
(`low_precision_copy`: the same weights, on the engine's device): the engine's
logits may be no further from the fp32 oracle than LOW_PRECISION_FACTOR times
transformers' own low-precision logits are, and its greedy tokens may part from
the oracle's only at a tie at this precision: where the oracle's margin between the
two tokens is within that factor of transformers' own low-precision error at that
step, or (MoE) where some layer's routing is such a tie (its k-th and k+1-th router
logits that close), since a flipped expert moves the logits far more than rounding.
Without such a copy, a fixed relative tolerance and near-tie rule.
"""
import copy
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
# How much further from fp32 than transformers' own low-precision run the engine may be (kernels
# round in other places and orders: same precision, different rounding) and the floor for a
# copy that happens to land very near fp32.
LOW_PRECISION_FACTOR = 3.0
LOW_PRECISION_FLOOR = 1e-3


def low_precision_copy(model):
    """transformers `model` (fp32, CPU) in the engine's dtype on its device; None in float32."""
    return None if IS_EXACT else copy.deepcopy(model).to(DEVICE, DTYPE).eval()


def last_logits(model, tokens: list[int]) -> torch.Tensor:
    """fp64 CPU logits of the last position of `tokens` under `model` (on whatever device it is)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(torch.tensor([tokens], device=device)).logits[0, -1].double().cpu()


def routing_tie(reference, low_reference, tokens: list[int]) -> bool:
    """Whether an MoE layer's choice of experts for the last token is a tie at the low precision:
    its fp32 k-th and k+1-th router logits within LOW_PRECISION_FACTOR of transformers' own
    low-precision router-logit error in that layer. False for a dense model."""
    top_k = getattr(reference.config, "num_experts_per_tok", None)
    if top_k is None:
        return False
    with torch.no_grad():
        exact = reference(torch.tensor([tokens]), output_router_logits=True).router_logits
        device = next(low_reference.parameters()).device
        low = low_reference(torch.tensor([tokens], device=device), output_router_logits=True).router_logits
    for fp32_layer, low_layer in zip(exact, low):
        row, low_row = fp32_layer.reshape(-1, fp32_layer.shape[-1])[-1].double(), low_layer.reshape(-1, low_layer.shape[-1])[-1].double().cpu()
        ranked = row.sort(descending=True).values
        if top_k < row.numel() and ranked[top_k - 1] - ranked[top_k] <= LOW_PRECISION_FACTOR * (low_row - row).abs().max():
            return True
    return False


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def assert_logits_close(out: torch.Tensor, ref: torch.Tensor, low_ref: torch.Tensor | None = None) -> None:
    """`out` (the engine's) against the fp32 `ref`; in low precision judged by `low_ref`
    (transformers' logits in the same precision) when given."""
    if IS_EXACT:
        torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=1e-4, rtol=1e-4)
    elif low_ref is None:
        assert relative_error(out, ref) < LOGITS_REL_TOL
    else:
        ours, theirs = relative_error(out, ref), relative_error(low_ref, ref)
        bound = max(LOW_PRECISION_FACTOR * theirs, LOW_PRECISION_FLOOR)
        assert ours <= bound, f"engine {ours:.2e} from fp32, transformers {DTYPE_NAME} {theirs:.2e}"


def greedy_divergence(engine_tokens: list[int], reference_tokens: list[int], prompt: list[int], reference,
                      low_reference=None) -> str | None:
    """None if the engine's greedy tokens are the (fp32) reference's, or part only at a tie at this
    precision (judged after the common prefix: by `low_reference`'s own error there when given,
    else by NEAR_TIE of the row's range); else a message."""
    for step, (ours, theirs) in enumerate(zip(engine_tokens, reference_tokens)):
        if ours == theirs:
            continue
        if IS_EXACT:
            return f"step {step}: engine {ours}, reference {theirs}"
        context = prompt + reference_tokens[:step]
        logits = last_logits(reference, context)
        margin = (logits[theirs] - logits[ours]).item()
        if low_reference is not None:
            noise = (last_logits(low_reference, context) - logits).abs().max().item()  # its own error at this step
            tie = LOW_PRECISION_FACTOR * noise
            detail = f"{DTYPE_NAME} transformers' largest logit error here {noise:.4f}"
        else:
            spread = (logits.max() - logits.min()).item()
            tie, detail = NEAR_TIE * spread, f"spread {spread:.3f}"
        if margin > tie and not (low_reference is not None and routing_tie(reference, low_reference, context)):
            return f"step {step}: engine {ours}, reference {theirs}, fp32 margin {margin:.4f}; {detail}"
        return None  # a tie at this precision: the sequences may differ from here on
    return None if len(engine_tokens) == len(reference_tokens) else "lengths differ"


def block_tables(prompts: list[list[int]], max_tokens: list[int], block_size: int = 4) -> list[tuple[int, ...]]:
    """Each sequence's KV blocks for its prompt and max_tokens, numbered from 0 one after another."""
    tables, next_block = [], 0
    for prompt, tokens in zip(prompts, max_tokens):
        count = -(-(len(prompt) + tokens) // block_size)
        tables.append(tuple(range(next_block, next_block + count)))
        next_block += count
    return tables
