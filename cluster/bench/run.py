"""`pdserve bench`: offer a load to a running server, measure what comes back, save JSON and plots.

A bench is a warm-up, then one run per offered rate (Poisson arrivals, at most
`concurrency` requests in flight; rate None with a concurrency is a closed
loop). While a run goes, the server's pool reports (`/v1/pdserve/status`) are
sampled every second; they, the client's records and the server's per-request
phase timings all go into the JSON, which `pdserve diagnose` reads back.

One Python process reads some thousands of streamed tokens a second; past that the
client, not the server, is measured. `processes` > 1 shares each run among that many
client processes (each 1/N of the requests, the rate and the concurrency; Poisson
arrivals split this way add up to the offered rate), started together, their
records merged into one run.
"""
from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from .client import BenchClient, GrpcClient, HttpClient, RequestRecord
from .result import BenchResult, Run
from .stats import RunSummary, Slo, percentile
from .workload import LengthRange, Workload, arrival_times

STATUS_INTERVAL_S = 1.0
LAG_PROBE_S = 0.01  # the client's loop is asked to wake every 10 ms; how late it wakes is its own lag
CLIENT_START_S = 60.0  # a client process connects within this


@dataclass(frozen=True)
class BenchConfig:
    url: str = "http://127.0.0.1:8000"  # HTTP API; also where the pools' status is read
    grpc_address: str | None = None  # set: requests go over gRPC instead
    api_key: str | None = None
    workload: Workload = Workload()
    num_requests: int = 100  # per run
    rates: tuple[float | None, ...] = (None,)  # requests/s per run; None: unbounded
    concurrency: int | None = None  # most requests in flight; None: unbounded
    warmup: int = 4
    slo: Slo = Slo(ttft_s=1.0, tpot_s=0.1)
    seed: int = 0
    progress: bool = True
    processes: int = 1  # client processes sharing each run


async def run_bench(config: BenchConfig, client: BenchClient | None = None) -> BenchResult:
    """Warm up, then one run per rate; `client`: one of your own instead of the HTTP or gRPC one."""
    client = client or _client(config)
    try:
        status = await _status(config.url, config.api_key)
        if config.warmup:
            warm = config.workload.requests(config.warmup, seed=config.seed + 1)
            await _run(client, warm, None, min(config.warmup, 4), config, "warm-up")
        runs = []
        for i, rate in enumerate(config.rates):
            label = f"rate {rate:g}/s" if rate is not None else f"concurrency {config.concurrency or 'all'}"
            shares = _shares(config, i, rate)
            if len(shares) == 1:
                runs.append(await _run(client, _specs(config, shares[0]), rate, config.concurrency, config, label))
            else:
                runs.append(await _run_shared(client, config, shares, label))
    finally:
        await client.close()
    protocol = "grpc" if config.grpc_address else "http"
    target = {"url": config.url, "grpc_address": config.grpc_address, "protocol": protocol, "status": status}
    return BenchResult(target, {**config.workload.describe(), "num_requests": config.num_requests,
                                "warmup": config.warmup, "seed": config.seed}, config.slo, runs)


@dataclass(frozen=True)
class _Share:
    """One client process's part of a run."""

    index: int
    num_requests: int
    rate: float | None
    concurrency: int | None
    seed: int


def _shares(config: BenchConfig, run_index: int, rate: float | None) -> list[_Share]:
    """The run split over the client processes; the first share is this process's (seeded as a lone client)."""
    n = max(1, min(config.processes, config.num_requests, config.concurrency or config.num_requests))

    def part(total: int, k: int) -> int:
        return total // n + (1 if k < total % n else 0)

    return [_Share(k, part(config.num_requests, k), rate and rate * part(config.num_requests, k) / config.num_requests,
                   config.concurrency and part(config.concurrency, k), config.seed + 2 + run_index + 1000 * k)
            for k in range(n)]


def _specs(config: BenchConfig, share: _Share) -> list:
    return config.workload.requests(share.num_requests, seed=share.seed)


async def _run_shared(client: BenchClient, config: BenchConfig, shares: list[_Share], label: str) -> Run:
    """One run from this process (the first share) and a child process per other share, started together."""
    spawn = multiprocessing.get_context("spawn")
    ready, results, go = spawn.Queue(), spawn.Queue(), spawn.Event()
    quiet = dataclasses.replace(config, progress=False)
    children = [spawn.Process(target=_child_main, args=(quiet, share, label, ready, go, results), daemon=True)
                for share in shares[1:]]
    loop = asyncio.get_running_loop()
    try:
        for child in children:
            child.start()
        for _ in children:
            try:
                await loop.run_in_executor(None, ready.get, True, CLIENT_START_S)
            except queue.Empty:
                raise RuntimeError(f"a bench client process did not start within {CLIENT_START_S:g} s") from None
        go.set()
        mine = shares[0]
        runs = [await _run(client, _specs(config, mine), mine.rate, mine.concurrency, config, label)]
        runs += await loop.run_in_executor(None, _collect, children, results)
    finally:
        for child in children:
            child.join(5.0)
            if child.is_alive():
                child.kill()
    records = [r for run in runs for r in run.requests]
    rate = shares[0].rate and sum(s.rate for s in shares)
    return Run(rate, config.concurrency, _span(records), records, runs[0].pools, max(run.client_lag_s for run in runs))


def _span(records: list[RequestRecord]) -> float:
    """Seconds from the first request sent to the last one done."""
    return max(r.sent_at + (r.e2e_s or 0.0) for r in records) - min(r.sent_at for r in records)


def _collect(children: list, results) -> list[Run]:
    """The children's runs, in any order; a child that dies without one fails the bench."""
    runs: list[Run] = []
    while len(runs) < len(children):
        try:
            runs.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [c for c in children if c.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a bench client process exited with code {dead[0].exitcode}") from None
    return runs


def _child_main(config: BenchConfig, share: _Share, label: str, ready, go, results) -> None:
    """A client process: connect, say ready, start on `go`, send its run back."""
    async def main() -> Run:
        client = _client(config)
        try:
            ready.put(share.index)
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            run = await _run(client, _specs(config, share), share.rate, share.concurrency, config, label,
                             sample_pools=False)
            for record in run.requests:
                record.client = share.index
            return run
        finally:
            await client.close()

    results.put(asyncio.run(main()))


async def _run(client: BenchClient, specs: list, rate: float | None, concurrency: int | None,
               config: BenchConfig, label: str, sample_pools: bool = True) -> Run:
    """Send `specs` at their Poisson times (at most `concurrency` at once); sample the pools meanwhile."""
    gate = asyncio.Semaphore(concurrency or len(specs))
    bar = tqdm(total=len(specs), desc=label, unit="req", file=sys.stderr, disable=not config.progress)
    started = time.perf_counter()
    records = [RequestRecord(sent_at=0.0, max_tokens=s.max_tokens, prompt_tokens=s.num_prompt_tokens or 0)
               for s in specs]

    async def one(spec, record: RequestRecord, at: float) -> None:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
        async with gate:
            record.sent_at = time.perf_counter() - started
            await client.send(spec, record)
        bar.update()

    pools: list[dict[str, Any]] = []
    lags: list[float] = []
    sampler = asyncio.create_task(_sample_pools(config.url, config.api_key, started, pools) if sample_pools
                                  else asyncio.sleep(0))
    probe = asyncio.create_task(_probe_lag(lags))
    try:
        times = arrival_times(len(specs), rate, seed=config.seed)
        await asyncio.gather(*(one(s, r, t) for s, r, t in zip(specs, records, times)))
    finally:
        sampler.cancel()
        probe.cancel()
        bar.close()
    lag = percentile(sorted(lags), 90) if lags else 0.0
    return Run(rate, concurrency, _span(records), records, pools, lag)


async def _probe_lag(into: list[float]) -> None:
    """How late the client's own event loop wakes: a client too busy to read its streams shows here."""
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_S)
        into.append(max(time.perf_counter() - asked - LAG_PROBE_S, 0.0))


def _status_client(url: str, api_key: str | None, timeout_s: float) -> httpx.AsyncClient:
    """A client for the server's status route, which needs the key when the server has one."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers)


async def _sample_pools(url: str, api_key: str | None, started: float, into: list[dict[str, Any]]) -> None:
    """Append the server's pool reports every `STATUS_INTERVAL_S` until cancelled."""
    async with _status_client(url, api_key, 5) as http:
        while True:
            try:
                pools = (await http.get("/v1/pdserve/status")).json()["pools"]
                into.append({"t": time.perf_counter() - started, "pools": pools})
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # a bench against a server without the status route still runs
            await asyncio.sleep(STATUS_INTERVAL_S)


async def _status(url: str, api_key: str | None) -> dict[str, Any] | None:
    try:
        async with _status_client(url, api_key, 10) as http:
            return (await http.get("/v1/pdserve/status")).json()
    except (httpx.HTTPError, ValueError):
        return None


def _client(config: BenchConfig) -> BenchClient:
    if config.grpc_address:
        return GrpcClient(config.grpc_address, config.api_key)
    return HttpClient(config.url, config.api_key)


def format_summary(summary: RunSummary) -> str:
    """A few lines a person reads: load, rates, latency percentiles in ms."""
    def ms(latency) -> str:
        if latency.count == 0:
            return "-"
        return f"p50 {1e3 * latency.p50:.0f}  p90 {1e3 * latency.p90:.0f}  p99 {1e3 * latency.p99:.0f} ms"

    load = f"{summary.rate:g} req/s" if summary.rate is not None else "unbounded"
    return "\n".join([
        f"offered {load}, concurrency {summary.concurrency or '-'}: {summary.num_ok}/{summary.num_requests} ok "
        f"in {summary.duration_s:.1f} s",
        f"  throughput {summary.throughput_rps:.2f} req/s ({summary.output_tokens_per_s:.0f} output tok/s), "
        f"goodput {summary.goodput_rps:.2f} req/s (SLO attainment {100 * summary.slo_attainment:.0f}%)",
        f"  TTFT {ms(summary.ttft)} | TPOT {ms(summary.tpot)}",
        f"  ITL  {ms(summary.itl)} | E2E  {ms(summary.e2e)}",
    ])


def main_config(args: Any) -> BenchConfig:
    """A `BenchConfig` from the flags bench and diagnose share (cli.py)."""
    try:
        workload = Workload(LengthRange.parse(args.prompt_tokens), LengthRange.parse(args.output_tokens),
                            args.dataset, args.shared_prefix_tokens)
        rates = tuple(None if r in ("inf", "max") else float(r) for r in (args.rates or "inf").split(","))
    except ValueError as e:
        raise SystemExit(f"pdserve: bad workload: {e}") from None
    return BenchConfig(
        url=args.url, grpc_address=args.grpc, api_key=args.api_key, workload=workload,
        num_requests=args.num_requests, rates=rates,
        concurrency=args.concurrency, warmup=args.warmup,
        slo=Slo((args.slo_ttft_ms or 1000.0) / 1e3, (args.slo_tpot_ms or 100.0) / 1e3), seed=args.seed,
        progress=not args.quiet, processes=args.processes)


def main(args: Any) -> int:
    """The `pdserve bench` command (flags in cli.py)."""
    from .plots import plot_bench  # matplotlib only when plotting

    result = asyncio.run(run_bench(main_config(args)))
    for run in result.runs:
        print(format_summary(run.summary(result.slo)))
        errors = [r.error for r in run.requests if r.error]
        if errors:
            print(f"  {len(errors)} failed, the first with: {errors[0]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    plots = plot_bench(result, out.with_suffix(""))
    print(f"wrote {out}" + "".join(f", {p}" for p in plots))
    return 0
