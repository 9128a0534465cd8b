"""bf16 at the Llama-3-8B width on a GPU: the engine keeps transformers' precision, fp32 as the oracle.

The tiny models of test_model_vs_transformers.py check every architecture; this checks the
engine's bf16 path (GEMV, paged attention, CUDA graphs) at a real width over a 1k context,
teacher-forced on the engine's own greedy tokens: 1 prefill + 16 decode steps. (It was
benchmarks/engine_speed.py's correctness section; four layers here, the benchmark's full depth
adds nothing to precision but minutes.) GPU only; ~6 GB.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from engine_target import relative_error
from pdserve.engine.loader import LoadedModel, _arrange
from pdserve.engine.model_spec import spec_from_config
from pdserve.engine.runner import DecodeInput, ModelRunner, PrefillChunk
from pdserve.engine.sharding import ShardLayout
from pdserve.engine.weight_reader import WeightReader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LLAMA3_8B_WIDTH = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, tie_word_embeddings=False)
PROMPT_TOKENS, DECODE_STEPS, BLOCK_SIZE = 1024, 16, 16
NEAR_TIE = 0.02  # of the fp32 row's range: a greedy choice closer than this may go either way in bf16


@pytest.fixture(scope="module")
def models():
    """(transformers in bf16, the engine on the same bf16 weights)."""
    import transformers

    config = transformers.LlamaConfig(**LLAMA3_8B_WIDTH, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    spec = spec_from_config(config)
    layout = ShardLayout.of(spec)
    weights = _arrange(WeightReader.of_tensors(dict(hf.state_dict())), spec, layout, torch.bfloat16,
                       torch.device("cuda"))
    loaded = LoadedModel(Path("random-llama3-width"), "random-llama3-width", spec, config, weights,
                         torch.bfloat16, torch.device("cuda"), layout)
    num_blocks = -(-(PROMPT_TOKENS + DECODE_STEPS) // BLOCK_SIZE)
    return hf, ModelRunner(loaded, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_decode_batch=1)


def test_bf16_engine_is_as_close_to_fp32_as_transformers_bf16(models):
    hf, runner = models
    prompt = torch.randint(0, runner.spec.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(7))
    prompt = prompt.tolist()
    table = tuple(range(runner.kv_cache.spec.num_blocks))
    with torch.inference_mode():
        logits = runner.prefill([PrefillChunk(tuple(prompt), 0, table)])
        ours, tokens = [logits[0].float().clone()], [int(logits[0].argmax())]
        for step in range(DECODE_STEPS):
            out = runner.decode([DecodeInput(tokens[-1], PROMPT_TOKENS + step, table)])  # a graph replay
            ours.append(out[0].float().clone())  # decode() returns the graph's static output
            tokens.append(int(out[0].argmax()))
        eager = runner.decode_eager([DecodeInput(tokens[-2], PROMPT_TOKENS + DECODE_STEPS - 1, table)])[0].float()
        rows = DECODE_STEPS + 1
        sequence = torch.tensor([prompt + tokens[:-1]], device="cuda")
        theirs = hf(sequence, logits_to_keep=rows).logits[0].float()
        for p in hf.parameters():
            p.data = p.data.float()  # the engine keeps its own references to the bf16 tensors
        oracle = hf(sequence, logits_to_keep=rows).logits[0].double()

    assert relative_error(ours[-1], eager) < 1e-3  # the graph computes what the eager step does
    engine_error = statistics.median(relative_error(o, r) for o, r in zip(ours, oracle))
    transformers_error = statistics.median(relative_error(t, r) for t, r in zip(theirs, oracle))
    assert engine_error <= 1.25 * transformers_error + 5e-3, (engine_error, transformers_error)
    for step, (o, r) in enumerate(zip(ours, oracle)):
        chosen, best = int(o.argmax()), int(r.argmax())
        margin, spread = (r[best] - r[chosen]).item(), (r.max() - r.min()).item()
        assert margin <= NEAR_TIE * spread, f"row {step}: engine {chosen}, fp32 {best}, margin {margin:.4f}"
