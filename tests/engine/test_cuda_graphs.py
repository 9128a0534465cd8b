"""Decode steps replayed from CUDA graphs equal eager steps; padding rows touch no real block."""
import pytest
import torch

from engine_target import DEVICE, DTYPE_NAME, IS_EXACT, relative_error
from pdserve.engine.cuda_graphs import decode_batch_sizes
from pdserve.engine.prefill_graphs import prefill_token_buckets
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


class _NoOp:
    """Stands in for torch.cuda.Event and CUDAGraph, so the host side of DecodeGraphs runs on the CPU."""

    def record(self) -> None: ...
    def synchronize(self) -> None: ...
    def replay(self) -> None: ...


def test_static_inputs_follow_changing_batches_and_block_tables(monkeypatch):
    """What each replay would read: the device-side inputs after run(), rows joining, leaving, growing."""
    from types import SimpleNamespace
    from pdserve.engine.cuda_graphs import DecodeGraphs

    monkeypatch.setattr(torch.cuda, "Event", _NoOp)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    kv_cache = SimpleNamespace(spec=SimpleNamespace(block_size=4, device=torch.device("cpu")))
    graphs = DecodeGraphs(None, kv_cache, max_batch=8, max_blocks=6, scratch_slot=999)
    for size in graphs.sizes:
        graphs._graphs[size], graphs._logits[size] = _NoOp(), torch.zeros(size, 3)
    tables = {0: (5, 1), 1: (2, 7, 3), 2: (4, 10), 3: (9, 8, 6, 0)}
    steps = [[0, 1, 2], [0, 1, 2], [1, 2, 3], [1], [0, 3]]
    for step, rows in enumerate(steps):
        if step == 4:
            tables[3] = tables[3] + (11,)  # grows, and its new token lands in the new block
        positions = [2 + step + r + (10 if step == 4 and r == 3 else 0) for r in rows]
        sources = [r - 1 if step % 2 else -1 for r in rows]  # odd steps take some tokens from the previous step
        logits = graphs.run([10 + r for r in rows], positions, [tables[r] for r in rows], sources)
        n, size = len(rows), graphs.size_for(len(rows))
        assert logits.shape == (n, 3) and logits.data_ptr() == graphs._logits[size].data_ptr()  # a view
        tokens, pos, slots, context, source = graphs.ids[:, :size].tolist()
        expected_slots = [tables[r][p // 4] * 4 + p % 4 for r, p in zip(rows, positions)]
        assert tokens == [10 + r for r in rows] + [0] * (size - n), f"step {step}"
        assert pos == positions + [0] * (size - n)
        assert slots == expected_slots + [999] * (size - n)  # padding rows write the scratch slot
        assert context == [p + 1 for p in positions] + [0] * (size - n)  # and read nothing
        assert source == sources + [-1] * (size - n)
        for row, r in enumerate(rows):
            assert graphs.block_tables[row, :len(tables[r])].tolist() == list(tables[r]), f"step {step} row {row}"


def test_position_past_the_blocks_is_refused_and_leaves_the_inputs(monkeypatch):
    from types import SimpleNamespace
    from pdserve.engine.cuda_graphs import DecodeGraphs

    monkeypatch.setattr(torch.cuda, "Event", _NoOp)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    kv_cache = SimpleNamespace(spec=SimpleNamespace(block_size=4, device=torch.device("cpu")))
    graphs = DecodeGraphs(None, kv_cache, max_batch=2, max_blocks=4, scratch_slot=99)
    graphs._graphs[1], graphs._logits[1] = _NoOp(), torch.zeros(1, 3)
    graphs.run([7], [2], [(3,)], [-1])
    with pytest.raises(IndexError):
        graphs.run([8], [4], [(5,)], [0])  # position 4 needs a second block
    graphs.run([9], [1], [(5,)], [-1])
    assert graphs.ids[:, 0].tolist() == [9, 1, 21, 2, -1]
    assert graphs.block_tables[0, 0].item() == 5


def test_prefill_buckets_double_up_to_the_largest():
    assert prefill_token_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert prefill_token_buckets(100) == (16, 32, 64, 100)
    assert prefill_token_buckets(16) == (16,)


def test_cpu_runner_has_no_prefill_graphs(tmp_path):
    save_tiny_model("llama", tmp_path)
    assert ModelRunner(load_model_dir(tmp_path), num_blocks=10, block_size=4).prefill_graphs is None


@needs_cuda
@pytest.mark.parametrize("length", [1, 16, 17, 100, 128, 129])  # 129 is past the largest graph: eager
def test_graph_prefill_equals_eager_prefill(tmp_path, length):
    save_tiny_model("llama", tmp_path)
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    graphed_runner = ModelRunner(loaded, 64, 4, max_graph_prefill_tokens=128)
    eager_runner = ModelRunner(loaded, 64, 4, max_graph_prefill_tokens=0)
    assert eager_runner.prefill_graphs is None
    prompt = tuple((11 * j) % 120 + 2 for j in range(length))
    table = tuple(range(-(-length // 4)))[::-1]  # out of order
    layers_done = []
    graphed = graphed_runner.prefill([PrefillChunk(prompt, 0, table)], on_layer_done=layers_done.append)
    eager = eager_runner.prefill([PrefillChunk(prompt, 0, table)])
    assert layers_done == list(range(loaded.spec.num_layers))
    assert graphed.shape == eager.shape == (1, loaded.spec.vocab_size)
    assert relative_error(graphed, eager) < (1e-5 if IS_EXACT else 1e-2)
    # The prompt's slots hold the same K/V; every other block of the pool is untouched (zeros).
    pool = lambda runner: runner.kv_cache.tensor[:, :, :64].flatten(2, 3)  # [layers, 2, slots, heads, dim]
    slots = [table[p // 4] * 4 + p % 4 for p in range(length)]
    assert relative_error(pool(graphed_runner)[:, :, slots], pool(eager_runner)[:, :, slots]) < (1e-5 if IS_EXACT else 1e-2)
    others = torch.ones(64 * 4, dtype=torch.bool, device=DEVICE)
    others[slots] = False
    assert not pool(graphed_runner)[:, :, others].any()


@needs_cuda
@pytest.mark.parametrize("lengths", [[40, 7], [3, 1, 9], [5] * 8, [5] * 9, [60, 60]])  # 9 prompts, 120 tokens: eager
def test_graph_prefill_of_several_prompts_equals_eager(tmp_path, lengths):
    save_tiny_model("llama", tmp_path)
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    graphed_runner = ModelRunner(loaded, 64, 4, max_graph_prefill_tokens=64)
    eager_runner = ModelRunner(loaded, 64, 4, max_graph_prefill_tokens=0)
    chunks, next_block = [], 0
    for i, length in enumerate(lengths):
        count = -(-length // 4)
        chunks.append(PrefillChunk(tuple((5 * j + i) % 120 + 2 for j in range(length)), 0,
                                   tuple(range(next_block, next_block + count))[::-1]))
        next_block += count
    graphed, eager = graphed_runner.prefill(chunks), eager_runner.prefill(chunks)
    assert graphed.shape == eager.shape == (len(lengths), loaded.spec.vocab_size)
    assert relative_error(graphed, eager) < (1e-5 if IS_EXACT else 1e-2)
    pool = lambda runner: runner.kv_cache.tensor[:, :, :64]
    assert relative_error(pool(graphed_runner), pool(eager_runner)) < (1e-5 if IS_EXACT else 1e-2)


@needs_cuda
def test_graph_prefills_of_different_prompts_in_a_row(tmp_path):
    """Replays reuse the static inputs: each batch's logits equal its eager prefill's."""
    save_tiny_model("llama", tmp_path)
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    graphed_runner = ModelRunner(loaded, 64, 4, max_graph_prefill_tokens=64)
    eager_runner = ModelRunner(loaded, 64, 4, max_graph_prefill_tokens=0)
    for length in (40, 7, 40, 33):
        prompt = tuple((5 * j + length) % 120 + 2 for j in range(length))
        chunk = PrefillChunk(prompt, 0, tuple(range(-(-length // 4))))
        graphed, eager = graphed_runner.prefill([chunk]), eager_runner.prefill([chunk])
        assert relative_error(graphed, eager) < (1e-5 if IS_EXACT else 1e-2), length


@needs_cuda
def test_captured_at_once_then_replayed(tmp_path):
    """capture_graphs (what GPU replicas run at start) captures every size; replays equal eager steps."""
    save_tiny_model("llama", tmp_path)
    loaded = load_model_dir(tmp_path, DEVICE, DTYPE_NAME)
    runner = ModelRunner(loaded, 64, 4, max_decode_batch=8, max_graph_prefill_tokens=32)
    eager_runner = ModelRunner(loaded, 64, 4, max_graph_prefill_tokens=0)
    runner.capture_graphs()
    graphs = runner.prefill_graphs
    assert set(graphs._graphs) == {(s, t) for s in graphs.seq_buckets for t in graphs.token_buckets}
    assert set(runner.decode_graphs._graphs) == set(runner.decode_graphs.sizes)
    chunks = [PrefillChunk(tuple(range(3, 3 + n)), 0, tuple(range(4 * i, 4 * i + 4))) for i, n in enumerate((9, 13))]
    assert relative_error(runner.prefill(chunks), eager_runner.prefill(chunks)) < (1e-5 if IS_EXACT else 1e-2)
