"""The engine's forward pass and greedy tokens equal transformers' on the same weights,
for each architecture of tests/tiny_models.py (sliding-window ones with prompts longer than the window).

Runs where engine_target says (CPU float32 by default; e.g. CUDA bfloat16 on a GPU). The oracle
is transformers in fp32; in a low precision the engine is judged against how far transformers
itself moves from fp32 in that precision (engine_target.low_precision_copy).
"""
import pytest
import torch

from engine_target import DEVICE, DTYPE_NAME, IS_EXACT, assert_logits_close, greedy_divergence, last_logits, low_precision_copy
from pdserve.engine.loader import load_model_dir
from pdserve.engine.offline import OfflineEngine, OfflineSequence
from pdserve.engine.runner import ModelRunner, PrefillChunk
from tiny_models import SLIDING_WINDOW, save_tiny_gemma3_multimodal, save_tiny_model

LONG = [(7 * i + 3) % 120 + 2 for i in range(37)]  # over 4 windows of tiny_models.SLIDING_WINDOW
PROMPTS = [[5, 17, 33, 2, 90, 11, 7], [3, 4], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 3], [42], LONG]


def assert_greedy_like_generate(sequences: list[OfflineSequence], reference) -> None:
    """Each sequence's output against fp32 generate() (no end of sequence) on the same weights."""
    low = low_precision_copy(reference)
    for seq in sequences:
        expected = reference.generate(torch.tensor([seq.prompt]), max_new_tokens=len(seq.output), do_sample=False,
                                      pad_token_id=0)
        assert greedy_divergence(seq.output, expected[0, len(seq.prompt):].tolist(), seq.prompt, reference, low) is None


def low_logits(low, tokens: list[int]) -> torch.Tensor | None:
    return None if low is None else last_logits(low, tokens)


def test_prefill_logits_match_transformers(tiny_model):
    _, directory, reference = tiny_model
    runner = ModelRunner(load_model_dir(directory, DEVICE, DTYPE_NAME), num_blocks=64, block_size=4)
    next_block = 0
    chunks = []
    for prompt in PROMPTS:
        count = -(-len(prompt) // 4)
        chunks.append(PrefillChunk(tuple(prompt), 0, tuple(range(next_block, next_block + count))))
        next_block += count
    logits = runner.prefill(chunks)
    low = low_precision_copy(reference)
    for row, prompt in enumerate(PROMPTS):
        assert_logits_close(logits[row], last_logits(reference, prompt), low_logits(low, prompt))


def test_greedy_tokens_equal_generate(tiny_model):
    _, directory, reference = tiny_model
    engine = OfflineEngine(load_model_dir(directory, DEVICE, DTYPE_NAME), num_blocks=128, block_size=4)
    sequences = [OfflineSequence(prompt, max_tokens=32) for prompt in PROMPTS]
    list(engine.generate(sequences, ignore_eos=True))
    reference.generation_config.eos_token_id = None  # 32 tokens each, like ignore_eos
    assert_greedy_like_generate(sequences, reference)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_chunked_prefill_with_cached_prefix_matches_transformers(tiny_model):
    """The long prompt in two chunks: the second attends to the first from the cache (its window, if any)."""
    _, directory, reference = tiny_model
    runner = ModelRunner(load_model_dir(directory, DEVICE, DTYPE_NAME), num_blocks=16, block_size=4)
    blocks = tuple(range(-(-len(LONG) // 4)))
    split = 21
    runner.prefill([PrefillChunk(tuple(LONG[:split]), 0, blocks)])
    logits = runner.prefill([PrefillChunk(tuple(LONG[split:]), split, blocks)])
    low = low_precision_copy(reference)
    assert_logits_close(logits[0], last_logits(reference, LONG), low_logits(low, LONG))


def test_gemma3_multimodal_checkpoint_serves_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration: its text_config and language_model weights, text prompts only."""
    reference = save_tiny_gemma3_multimodal(tmp_path)
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    assert loaded.spec.architecture == "gemma3"
    engine = OfflineEngine(loaded, num_blocks=128, block_size=4)
    sequences = [OfflineSequence(prompt, max_tokens=32) for prompt in PROMPTS]
    list(engine.generate(sequences, ignore_eos=True))
    reference.generation_config.eos_token_id = None
    assert_greedy_like_generate(sequences, reference)


@pytest.mark.parametrize("arch, overrides", [("mistral_sliding", {}), ("qwen2_sliding", {"max_window_layers": 0})],
                         ids=["mistral", "qwen2-every-layer"])
def test_blocks_outside_every_window_return_while_decoding(arch, overrides, tmp_path):
    """Every layer slides: a prompt over four windows, 32 tokens past it; tokens still equal generate()."""
    reference = save_tiny_model(arch, tmp_path, **overrides)
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    assert loaded.spec.kv_window == SLIDING_WINDOW
    engine = OfflineEngine(loaded, num_blocks=64, block_size=4)
    seq = OfflineSequence(LONG, max_tokens=32)
    free_before_last_step = []
    for _ in engine.generate([seq], ignore_eos=True):
        free_before_last_step.append(engine.pool.num_free)
    reference.generation_config.eos_token_id = None
    assert_greedy_like_generate([seq], reference)
    # The last step's query (position 37 + 30) sees positions 60..67: blocks 0..14 of 4 tokens went back.
    assert engine.num_blocks_returned == (len(LONG) + 31 - SLIDING_WINDOW) // 4
    assert free_before_last_step[-1] == 64 - (-(-(len(LONG) + 32) // 4)) + engine.num_blocks_returned
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_layer_with_the_whole_context_keeps_every_block(tmp_path):
    """Qwen2 whose first layer attends to everything: nothing can be returned."""
    save_tiny_model("qwen2_sliding", tmp_path)  # max_window_layers=1
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    assert loaded.spec.kv_window is None
    engine = OfflineEngine(loaded, num_blocks=64, block_size=4)
    list(engine.generate([OfflineSequence(LONG, max_tokens=8)], ignore_eos=True))
    assert engine.num_blocks_returned == 0


def test_gemma3_final_logit_softcapping_is_applied(tmp_path):
    """tiny_models' Gemma 3 sets final_logit_softcapping (real Gemma 3 configs leave it null): the engine's
    logits equal transformers' capped ones, and are far from what they would be uncapped."""
    reference = save_tiny_model("gemma3", tmp_path)
    cap = reference.config.final_logit_softcapping
    assert cap and load_model_dir(tmp_path, DEVICE, DTYPE_NAME).spec.final_logit_softcap == cap
    runner = ModelRunner(load_model_dir(tmp_path, DEVICE, DTYPE_NAME), num_blocks=16, block_size=4)
    logits = runner.prefill([PrefillChunk(tuple(LONG), 0, tuple(range(-(-len(LONG) // 4))))])[0]
    capped = last_logits(reference, LONG)
    low = low_precision_copy(reference)
    assert_logits_close(logits, capped, low_logits(low, LONG))
    uncapped = torch.atanh(capped / cap) * cap  # transformers' logits before its cap
    if IS_EXACT:  # (in bf16 the cap's effect here, ~0.1, is within rounding)
        assert (uncapped - capped).abs().max() > 10 * (logits.double().cpu() - capped).abs().max()
