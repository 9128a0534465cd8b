"""What each rank runs in the TP tests (module-level: spawned processes import them)."""
from __future__ import annotations

import os
import time

import torch

from pdserve.engine.parallel import CollectiveTimeout, TensorParallel


def collectives(tp: TensorParallel) -> dict:
    x = torch.full((3,), float(tp.rank + 1))
    tp.all_reduce(x)
    gathered = tp.all_gather(torch.tensor([[tp.rank, 10 + tp.rank]]), dim=-1)
    command = tp.broadcast({"step": 7, "rows": [1, 2, 3]} if tp.is_leader else None)
    return {"sum": x.tolist(), "gathered": gathered.tolist(), "command": command}


def one_rank_dies(tp: TensorParallel) -> str:
    """Rank 1 exits without a word; rank 0's next collective must end with CollectiveTimeout, not hang."""
    tp.barrier()
    if tp.rank == 1:
        os._exit(0)
    time.sleep(0.5)
    started = time.monotonic()
    try:
        tp.all_reduce(torch.ones(4))
    except CollectiveTimeout as e:
        return f"raised after {time.monotonic() - started:.1f}s: {e}"
    return "no error"


def generate_greedy(tp: TensorParallel, model_dir: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """This rank's shard, the same greedy generation on every rank: outputs and the rank's KV heads."""
    from pdserve.engine.loader import load_model_dir
    from pdserve.engine.offline import OfflineEngine, OfflineSequence

    loaded = load_model_dir(model_dir, "cpu", "float32", rank=tp.rank, tp_size=tp.size)
    engine = OfflineEngine(loaded, num_blocks=64, block_size=4, tp=tp)
    sequences = [OfflineSequence(list(p), max_tokens) for p in prompts]
    list(engine.generate(sequences, ignore_eos=True))
    return {"outputs": [s.output for s in sequences], "kv_heads": engine.runner.kv_cache.spec.num_kv_heads,
            "qkv_rows": loaded.weights.layers[0].qkv.out_features}
