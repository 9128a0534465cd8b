"""Host time of one graphed decode step, without a GPU: what `ModelRunner.decode` costs the CPU.

    .venv/bin/python benchmarks/decode_host.py [--steps 2000]

`DecodeGraphs` runs as on CUDA up to the replay, with its device tensors on
torch's meta device (every copy and clone is dispatched, none moves bytes) and
the graphs and CUDA events replaced by no-ops. What is left is the per-step
Python, numpy and torch-dispatch work that runs before the GPU can start.
Llama-3-8B's graph shapes: batch up to 64, 512 block-table columns (8k tokens
in 16-token blocks). Three cases per batch size: the same inputs every step;
positions advancing by one a step (new tokens and slots, block tables
unchanged); and the decode worker's loop, which also builds each step's inputs
from its sequences (`decode_worker.steps.decode_input`).
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from pdserve.decode_worker.sequence import DecodeSequence
from pdserve.decode_worker.steps import decode_input
from pdserve.engine.block_pool import BlockPool, BlockTable
from pdserve.engine.cuda_graphs import DecodeGraphs
from pdserve.engine.runner import DecodeInput, ModelRunner

BLOCK_SIZE, MAX_BLOCKS, MAX_BATCH, CONTEXT = 16, 512, 64, 1024
ADVANCE = 128  # advancing positions wrap after this many steps (the tables hold that much room)


class _NoOp:
    """Stands in for torch.cuda.Event and CUDAGraph."""

    def record(self) -> None: ...
    def synchronize(self) -> None: ...
    def replay(self) -> None: ...


def fake_runner(vocab: int) -> ModelRunner:
    """A ModelRunner whose decode graphs are no-ops over meta-device inputs."""
    torch.cuda.Event = _NoOp
    torch.Tensor.pin_memory = lambda self: self
    kv_cache = SimpleNamespace(spec=SimpleNamespace(block_size=BLOCK_SIZE, device=torch.device("meta")))
    graphs = DecodeGraphs(None, kv_cache, MAX_BATCH, MAX_BLOCKS, scratch_slot=0)
    for size in graphs.sizes:
        graphs._graphs[size] = _NoOp()
        graphs._logits[size] = torch.zeros(size, vocab, device="meta")
    runner = ModelRunner.__new__(ModelRunner)
    runner.decode_graphs, runner.block_size = graphs, BLOCK_SIZE
    return runner


def step_inputs(batch: int, steps: int, advancing: bool) -> list[list[DecodeInput]]:
    """`steps` batches of `batch` sequences at CONTEXT tokens, each with its own shuffled blocks."""
    width = (CONTEXT + ADVANCE) // BLOCK_SIZE
    order = torch.randperm(batch * width, generator=torch.Generator().manual_seed(0)).tolist()
    tables = [tuple(order[i * width:(i + 1) * width]) for i in range(batch)]
    return [[DecodeInput(7 + i + s, CONTEXT - 1 + (s % ADVANCE if advancing else 0), tables[i]) for i in range(batch)]
            for s in range(steps)]


def time_steps(runner: ModelRunner, inputs: list[list[DecodeInput]], repeats: int = 5) -> float:
    """Microseconds of runner.decode: the median over the prepared steps, the least of `repeats` passes
    (this machine's other load only ever adds time)."""
    medians = []
    for _ in range(repeats):
        times = []
        for batch in inputs:
            t0 = time.perf_counter()
            runner.decode(batch)
            times.append((time.perf_counter() - t0) * 1e6)
        medians.append(statistics.median(times))
    return min(medians)


def time_worker_steps(runner: ModelRunner, batch: int, steps: int, repeats: int = 5) -> float:
    """Microseconds of decode_input + runner.decode, each step one token longer (least median of `repeats`)."""
    pool = BlockPool(batch * MAX_BLOCKS, BLOCK_SIZE)
    sequences = []
    for i in range(batch):
        table = BlockTable(pool)
        table.ensure_capacity(CONTEXT + steps * repeats)
        sequence = DecodeSequence(f"r{i}", i, table, CONTEXT, steps * repeats, deadline=0.0)
        sequence.prompt, sequence.generated = list(range(CONTEXT - 1)), [7 + i]
        sequences.append(sequence)
    medians = []
    for _ in range(repeats):
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            runner.decode([decode_input(s) for s in sequences])
            times.append((time.perf_counter() - t0) * 1e6)
            for sequence in sequences:
                sequence.generated.append(5)
        medians.append(statistics.median(times))
    return min(medians)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    runner = fake_runner(args.vocab)
    for batch in (1, 8, 64):
        same = time_steps(runner, step_inputs(batch, args.steps, advancing=False))
        advancing = time_steps(runner, step_inputs(batch, args.steps, advancing=True))
        worker = time_worker_steps(runner, batch, args.steps)
        print(f"decode host B={batch}: same inputs {same:.1f} us, advancing positions {advancing:.1f} us, "
              f"worker loop {worker:.1f} us")


if __name__ == "__main__":
    main()
