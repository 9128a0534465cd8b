"""Decode steps replayed from CUDA graphs equal eager steps; padding rows touch no real block."""
import pytest
import torch

from engine_target import DEVICE, DTYPE_NAME, IS_EXACT, relative_error
from pdserve.engine.cuda_graphs import decode_batch_sizes
from pdserve.engine.loader import load_model_dir
from pdserve.engine.runner import DecodeInput, ModelRunner, PrefillChunk
from tiny_models import save_tiny_model

needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need PDSERVE_TEST_DEVICE=cuda")


def test_batch_sizes_cover_every_batch_up_to_the_largest():
    assert decode_batch_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert decode_batch_sizes(5) == (1, 2, 4, 5)
    assert decode_batch_sizes(1) == (1,)


def test_cpu_runner_stays_eager_with_the_pool_it_was_asked_for(tmp_path):
    save_tiny_model("llama", tmp_path)
    runner = ModelRunner(load_model_dir(tmp_path), num_blocks=10, block_size=4)
    assert runner.decode_graphs is None
    assert runner.kv_cache.tensor.shape[2] == runner.kv_cache.spec.num_blocks == 10


def _prefilled_runner(tmp_path, prompts, block_size=4, num_blocks=128, max_decode_batch=8):
    save_tiny_model("llama", tmp_path)
    runner = ModelRunner(load_model_dir(tmp_path, DEVICE, DTYPE_NAME), num_blocks, block_size,
                         max_decode_batch=max_decode_batch)
    tables, next_block = [], 0
    for prompt in prompts:
        count = -(-(len(prompt) + 8) // block_size)  # room for a few decode steps
        tables.append(tuple(range(next_block, next_block + count))[::-1])  # out of order
        next_block += count
    runner.prefill([PrefillChunk(tuple(p), 0, t) for p, t in zip(prompts, tables)])
    return runner, tables


@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 8, 9])  # 3 pads to 4; 9 is past the largest graph: eager
def test_graph_step_equals_eager_step(tmp_path, batch):
    prompts = [[(7 * i + j) % 120 + 2 for j in range(3 + 5 * i)] for i in range(batch)]
    runner, tables = _prefilled_runner(tmp_path, prompts)
    assert runner.kv_cache.spec.num_blocks == 128 and runner.kv_cache.tensor.shape[2] == 129  # + scratch
    inputs = [DecodeInput(5 + i, len(p), t) for i, (p, t) in enumerate(zip(prompts, tables))]
    before = runner.kv_cache.tensor.clone()
    graphed = runner.decode(inputs)
    after_graph = runner.kv_cache.tensor.clone()
    runner.kv_cache.tensor.copy_(before)
    eager = runner.decode_eager(inputs)
    after_eager = runner.kv_cache.tensor
    # Only the step's own slots change in the pool (padding rows write the scratch block),
    # and they hold the same K/V as the eager step wrote.
    flat = lambda kv: kv[:, :, :128].flatten(2, 3)  # [layers, 2, pool slots, kv_heads, head_dim]
    written = torch.zeros(128 * 4, dtype=torch.bool, device=DEVICE)
    written[[t[i.position // 4] * 4 + i.position % 4 for i, t in zip(inputs, tables)]] = True
    assert torch.equal(flat(after_graph)[:, :, ~written], flat(before)[:, :, ~written])
    assert relative_error(flat(after_graph)[:, :, written], flat(after_eager)[:, :, written]) < (1e-6 if IS_EXACT else 1e-2)
    assert graphed.shape == eager.shape == (batch, runner.spec.vocab_size)
    if IS_EXACT:
        torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)
    else:
        assert relative_error(graphed, eager) < 1e-2


@needs_cuda
def test_graphs_follow_changing_batches_and_block_tables(tmp_path):
    """Steps with sequences joining, leaving and crossing blocks: each equals the eager step."""
    prompts = [[3 + i, 9, 11 + i, 4] * (i + 1) for i in range(6)]
    runner, tables = _prefilled_runner(tmp_path, prompts)
    positions = [len(p) for p in prompts]
    for step, rows in enumerate([[0, 1, 2], [0, 1, 2], [1, 2, 3, 4, 5], [5, 0], [0, 1, 2, 3, 4, 5]]):
        inputs = [DecodeInput((step * 13 + r) % 120 + 2, positions[r] + step, tables[r]) for r in rows]
        snapshot = runner.kv_cache.tensor.clone()
        eager = runner.decode_eager(inputs)
        runner.kv_cache.tensor.copy_(snapshot)
        graphed = runner.decode(inputs)
        assert relative_error(graphed, eager) < (1e-5 if IS_EXACT else 1e-2), f"step {step}"
