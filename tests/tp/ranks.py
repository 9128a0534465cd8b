"""Running a function on N real processes, one per TP rank, over gloo on the CPU."""
from __future__ import annotations

import queue
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from pdserve.engine.parallel import Rendezvous, TensorParallel, host_rendezvous


def _rank_main(body: Callable[..., Any], rendezvous: Rendezvous, rank: int, size: int, args: tuple,
               results: Any) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # N ranks share the machine's cores
        tp = TensorParallel.join(rendezvous, rank, size)
        results.put((rank, "ok", body(tp, *args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_ranks(body: Callable[..., Any], size: int, *args: Any, timeout_s: float = 120.0,
              collective_timeout_s: float = 20.0) -> list[Any]:
    """`body(tp, *args)` on `size` spawned processes; their return values in rank order
    (None for a rank that exited without one).

    `body` must be importable (a module-level function of a test helper module)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    # Spawned ranks import torch at their own pace on a busy box: meeting may take far longer than a collective
    # The store lives here, in the parent, for the test's length: every rank connects to it
    rendezvous, _store = host_rendezvous("127.0.0.1", timeout_s=collective_timeout_s, join_timeout_s=60.0)
    processes = [context.Process(target=_rank_main, args=(body, rendezvous, rank, size, args, results), daemon=True)
                 for rank in range(size)]
    for p in processes:
        p.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcomes) < size and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=0.5)
                outcomes[rank] = (status, value)
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and results.empty():
                    break
        if len(outcomes) < size and any(p.is_alive() for p in processes):
            raise AssertionError(f"ranks {sorted(set(range(size)) - set(outcomes))} gave no result "
                                 f"in {timeout_s} s")
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {v}" for r, (s, v) in sorted(outcomes.items()) if s == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [outcomes.get(r, ("exited", None))[1] for r in range(size)]
