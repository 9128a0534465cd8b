"""`pdserve status`: both pools' replicas, the autoscaler's targets and the reason for its last decision."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def format_status(status: dict[str, Any]) -> str:
    """The router's /v1/pdserve/status answer, in words."""
    note = status.get("autoscaling", {}).get("autoscaling") or {}
    pools = status.get("pools", {})
    lines = [f"model: {status.get('model')}"]
    for pool in sorted(set(pools) | set(note.get("pools", {}))):
        replicas = pools.get(pool, {})
        sizes = note.get("pools", {}).get(pool)
        size = (f"{sizes['replicas']} running, target {sizes['target']}" if sizes else f"{len(replicas)} running (fixed)")
        gpus = sum(stats.get("num_gpus", 1) for stats in replicas.values())  # a TP replica holds several
        lines.append(f"{pool}: {size}, {gpus:g} GPU{'s' if gpus != 1 else ''}")
        if sizes and sizes.get("reason"):
            lines.append(f"  now: {sizes['reason']}")
        for replica_id, stats in sorted(replicas.items()):
            detail = ", ".join(f"{k}={_short(v)}" for k, v in stats.items() if k in _SHOWN)
            lines.append(f"  {replica_id}: {detail}")
    if note:
        slo = note.get("slo", {})
        lines.append(f"SLO: TTFT {slo.get('ttft_ms', 0):.0f} ms, TPOT {slo.get('tpot_ms', 0):.0f} ms")
        lines.append(f"last decision: {note.get('last_decision') or 'none yet'}")
    else:
        lines.append("autoscaling: off (fixed pool sizes)")
    return "\n".join(lines)


_SHOWN = {"tensor_parallel_size", "num_gpus", "queued_tokens", "queued_requests", "tokens_per_s", "prefix_hit_rate", "num_running", "num_waiting", "num_blocks_used",
          "num_blocks_free", "step_time_s", "gpu_step_time_s", "gpu_idle_share", "max_running", "is_draining"}


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def show_status(args: argparse.Namespace) -> int:
    import httpx

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        response = httpx.get(f"{args.url.rstrip('/')}/v1/pdserve/status", headers=headers, timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as e:
        print(f"pdserve status: {args.url}: {e}", file=sys.stderr)
        return 1
    print(format_status(response.json()))
    return 0
