"""Prefill on one runner, move the blocks, decode on another: the same tokens."""
import torch

from engine_target import DEVICE, DTYPE_NAME, IS_EXACT, relative_error
from pdserve.engine.loader import load_model_dir
from pdserve.engine.offline import OfflineEngine, OfflineSequence
from pdserve.engine.runner import DecodeInput, ModelRunner, PrefillChunk
from pdserve.engine.sampler import SamplingParams, sample
from tiny_models import save_tiny_model

PROMPT = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]


def test_blocks_moved_between_runners_decode_to_the_same_tokens(tmp_path):
    save_tiny_model("llama", tmp_path)
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    reference = OfflineEngine(loaded, num_blocks=32, block_size=4)
    expected = OfflineSequence(PROMPT, max_tokens=20)
    list(reference.generate([expected], ignore_eos=True))

    prefill, decode = ModelRunner(loaded, 32, 4), ModelRunner(loaded, 40, 4)
    src_blocks, dst_blocks = (0, 1, 2), (37, 5, 20, 9, 30, 31, 32, 33)  # other ids, out of order
    first = sample(prefill.prefill([PrefillChunk(tuple(PROMPT), 0, src_blocks)]), [SamplingParams()], [len(PROMPT)])
    for layer in range(loaded.spec.num_layers):
        data = prefill.kv_cache.export_blocks(layer, torch.tensor(src_blocks))
        decode.kv_cache.import_blocks(layer, torch.tensor(dst_blocks[:3]), data)

    tokens = [first.token_ids[0]]
    while len(tokens) < 20:
        position = len(PROMPT) + len(tokens) - 1
        logits = decode.decode([DecodeInput(tokens[-1], position, dst_blocks)])
        tokens.append(sample(logits, [SamplingParams()], [position + 1]).token_ids[0])
    assert tokens == expected.output  # the same kernels on the same values: exact in any dtype


def test_chunked_prefill_equals_one_pass(tmp_path):
    save_tiny_model("qwen2", tmp_path)
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    runner = ModelRunner(loaded, 16, 4)
    prompt = tuple(range(3, 3 + 14))
    whole = runner.prefill([PrefillChunk(prompt, 0, (0, 1, 2, 3))])
    runner.prefill([PrefillChunk(prompt[:8], 0, (4, 5))])
    chunked = runner.prefill([PrefillChunk(prompt[8:], 8, (4, 5, 6, 7))])
    kv = runner.kv_cache.tensor
    if IS_EXACT:
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv[:, :, 4:8], kv[:, :, 0:4], atol=1e-5, rtol=1e-5)
    else:  # the chunk attends over the cache in another order: bf16 rounding differs
        assert relative_error(chunked, whole) < 2e-2
        assert relative_error(kv[:, :, 4:8], kv[:, :, 0:4]) < 2e-2
