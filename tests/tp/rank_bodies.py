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
    mlps = [layer.mlp for layer in loaded.weights.layers]
    mlp = next((m for m in mlps if hasattr(m, "w13")), mlps[0])  # the first MoE layer's, if any
    return {"outputs": [s.output for s in sequences], "kv_heads": engine.runner.kv_cache.spec.num_kv_heads,
            "qkv_rows": loaded.weights.layers[0].qkv.out_features, "lm_head_rows": loaded.weights.lm_head.out_features,
            "mlp_rows": mlp.w13.shape[1] if hasattr(mlp, "w13") else mlp.gate_up.out_features}


def _shard_runner(tp: TensorParallel, model_dir: str, num_blocks: int = 32, block_size: int = 4):
    from pdserve.engine.loader import load_model_dir
    from pdserve.engine.runner import ModelRunner
    from pdserve.engine.transfer import KvShard

    loaded = load_model_dir(model_dir, "cpu", "float32", rank=tp.rank, tp_size=tp.size)
    runner = ModelRunner(loaded, num_blocks, block_size, tp=tp)
    return runner, KvShard(tp.rank, tp.size, loaded.spec.num_kv_heads)


def prefill_group(tp: TensorParallel, model_dir: str, prompt: list[int], destination) -> int | None:
    """A TP prefill replica: the leader's PrefillWorker pushes every rank's heads to `destination`."""
    from pdserve.engine.messages import PrefillRequest, SamplingParams
    from pdserve.engine.tp_runner import TpRunner, follow
    from pdserve.engine.transfer import make_sender
    from pdserve.cluster.config import load_config
    from pdserve.cluster.settings import prefill_settings
    from pdserve.prefill_worker.worker import PrefillWorker

    runner, shard = _shard_runner(tp, model_dir)
    sender = make_sender("gloo", runner.kv_cache, sender_id=f"prefill-r{tp.rank}", timeout_s=30.0, shard=shard)
    if not tp.is_leader:
        follow(runner, sender)
        sender.close()
        return None
    leader = TpRunner(runner, sender)
    worker = PrefillWorker(leader, sender, prefill_settings(load_config(
        {"prefill": {"max_batch_tokens": 8}, "kv_cache": {"block_size": runner.kv_cache.spec.block_size}})), "prefill-tp")
    try:  # max_batch_tokens 8: the prompt runs in chunks, each pushing its blocks
        result = worker.submit(PrefillRequest("r1", tuple(prompt), SamplingParams(), destination, time.time() + 60)).result(60)
        return result.first_token
    finally:
        leader.stop()
        worker.close()


def decode_group(tp: TensorParallel, model_dir: str, block_ids: tuple[int, ...], destinations, first_tokens,
                 num_prompt: int, max_tokens: int) -> dict:
    """A TP decode replica: every rank receives its heads, then the leader drives greedy decode steps."""
    from pdserve.engine.runner import DecodeInput
    from pdserve.engine.sampler import SamplingParams
    from pdserve.engine.tp_runner import TpRunner, follow
    from pdserve.engine.transfer import make_receiver

    runner, shard = _shard_runner(tp, model_dir)
    receiver = make_receiver("gloo", runner.kv_cache, peer_id=f"decode-r{tp.rank}", timeout_s=30.0, shard=shard)
    try:
        receiver.expect(1, block_ids)
        destinations.put((tp.rank, receiver.destination(1, block_ids)))
        outcome = receiver.wait(1, 60.0)
        tp.barrier()
        if not tp.is_leader:
            follow(runner)
            return {"landed": outcome.is_ok}
        leader = TpRunner(runner)
        tokens = [first_tokens.get(timeout=60)]
        while len(tokens) < max_tokens:
            position = num_prompt + len(tokens) - 1
            pending = leader.decode_and_sample([DecodeInput(tokens[-1], position, block_ids)], [SamplingParams()])
            tokens.append(pending.result().token_ids[0])
        leader.stop()
        return {"landed": outcome.is_ok, "tokens": tokens}
    finally:
        receiver.close()


def idle_follower(tp: TensorParallel) -> object:
    """The leader sends its first step long after the collective timeout: the follower still gets it."""
    if tp.is_leader:
        time.sleep(3.0)
        return tp.broadcast(("step", 1))
    return tp.broadcast(idle=True)
