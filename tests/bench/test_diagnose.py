"""The diagnosis on synthetic bench results: the phase named, the ratio moved, the words said."""
import pytest

from pdserve.cluster.bench.result import BenchResult, Run
from pdserve.cluster.bench.client import RequestRecord
from pdserve.cluster.bench.stats import Slo
from pdserve.cluster.bench.diagnose import diagnose, report

SLO = Slo(ttft_s=1.0, tpot_s=0.1)
STATUS = {"model": "tiny", "colocated": False, "pools": {"prefill": {"p0": {}}, "decode": {"d0": {}}}}


def record(sent_at, prompt, output, queue, prefill, tpot, kv=0.005, front=0.01) -> RequestRecord:
    ttft = queue + prefill + kv
    chunks = [ttft + front + i * tpot for i in range(output)]
    server = {"queue_s": queue, "prefill_s": prefill, "kv_transfer_s": kv, "ttft_s": ttft, "tpot_s": tpot,
              "e2e_s": chunks[-1] - front, "decode_s": chunks[-1] - chunks[0], "kv_bytes": 1024 * prompt}
    return RequestRecord(sent_at, output, prompt, output, chunks, chunks[-1], None, server)


def pools(tokens_per_s, steps) -> list[dict]:
    return [{"t": i, "pools": {"prefill": {"p0": {"tokens_per_s": tokens_per_s, "queued_tokens": 0}},
                               "decode": {"d0": {"batch_size": b, "step_time_s": s, "num_running": b}}}}
            for i, (b, s) in enumerate(steps)]


def result(runs) -> BenchResult:
    return BenchResult({"status": STATUS}, {}, SLO, runs)


def test_long_prompts_that_queue_are_prefill_bound_and_want_more_prefill_replicas():
    # 900-token prompts at 4500 tokens/s: 0.2 s each; at 4 req/s the queue grows to seconds
    light = Run(1.0, None, 10.0, [record(i, 900, 2, 0.05, 0.2, 0.02) for i in range(10)],
                pools(4500, [(1, 0.02), (2, 0.022)]))
    heavy = Run(4.0, None, 10.0, [record(i / 4, 900, 2, 1.5 + i / 40, 0.2, 0.02) for i in range(40)],
                pools(4500, [(1, 0.02), (2, 0.022)]))
    d = diagnose(result([heavy, light]))
    assert [round(p.throughput_rps) for p in d.points] == [1, 4]
    assert [p.bottleneck for p in d.points] == ["prefill", "prefill"]
    assert d.bottleneck == "prefill" and d.broken_at_rps == pytest.approx(4.0)
    assert d.best.num_prefill > d.best.num_decode and d.gain > 0
    assert "Bottleneck: PREFILL" in report(d)


def test_long_answers_in_big_batches_are_decode_bound_and_want_more_decode_replicas():
    # step time grows with the batch: 16 running sequences take 0.15 s a step, past the 0.1 s TPOT SLO
    steps = [(4, 0.05), (8, 0.083), (16, 0.15)]
    heavy = Run(None, 16, 20.0, [record(i / 2, 4, 128, 0.001, 0.005, 0.15, front=0.3) for i in range(40)],
                pools(5000, steps))
    d = diagnose(result([heavy]))
    assert d.points[0].decode_ratio == pytest.approx(1.5, rel=0.01)
    assert d.points[0].prefill_ratio < 0.1  # the client's TTFT includes 0.3 s outside the phases: not prefill's
    assert d.bottleneck == "decode"
    assert d.best.num_decode > d.best.num_prefill
    assert "Bottleneck: DECODE" in report(d)


def test_slos_no_single_request_can_meet_leave_no_ratio_to_recommend():
    slow = Run(1.0, None, 10.0, [record(i, 900, 2, 0.0, 3.0, 0.02) for i in range(10)], pools(300, [(1, 0.02)]))
    d = diagnose(result([slow]))
    assert d.best.max_goodput_rps == 0 and d.alone is None
    assert "No split holds both SLOs" in report(d) and "single request meets the SLO is unmeasured" in report(d)
    alone = Run(None, 1, 3.1, [record(0.0, 900, 2, 0.0, 3.0, 0.02)], pools(300, [(1, 0.02)]))
    measured = diagnose(result([alone, slow]))
    assert measured.alone.count == 1 and measured.alone.ttft_s > SLO.ttft_s
    assert "a single request is slower than the SLO" in report(measured)


# The H200 case of issue 24: 256 in flight, 128-token prompts, 256-token answers, TPOT SLO 20 ms. The served
# step took 29 ms while the GPU was busy 10.3 ms of it (the engine's own step at batch 256); one request alone
# had TPOT 4.5 ms; the deployment ran max_running 256.
def host_bound_pools(batch=256, step=0.029, gpu=0.0103) -> list[dict]:
    decode = {"batch_size": batch, "num_running": batch, "num_waiting": 40, "num_context_tokens": batch * 250,
              "step_time_s": step, "gpu_step_time_s": gpu, "gpu_idle_share": 1 - gpu / step,
              "launch_time_s": 0.001, "max_running": 256, "num_blocks_total": 40000, "kv_block_size": 16,
              "engine_steps": [[1, 0.0036], [256, 0.0103]], "mbu_busy": 0.6, "mbu_wall": 0.21}
    return [{"t": i, "pools": {"prefill": {"p0": {"tokens_per_s": 200000, "queued_tokens": 0}},
                               "decode": {"d0": decode}}} for i in range(5)]


def test_a_gpu_idle_while_sequences_wait_is_host_bound_not_decode_bound():
    loaded = Run(None, 256, 20.0, [record(i / 20, 128, 256, 0.002, 0.01, 0.029, front=0.005) for i in range(256)],
                 host_bound_pools())
    alone = Run(None, 1, 1.2, [record(0.0, 128, 256, 0.0, 0.01, 0.0045)], host_bound_pools(1, 0.0045, 0.0036))
    d = diagnose(BenchResult({"status": STATUS}, {}, Slo(ttft_s=1.0, tpot_s=0.02), [alone, loaded]))
    assert d.bottleneck == "host" and d.host_part == "decode loop" and d.phase == "decode"
    text = report(d)
    assert "Bottleneck: HOST (decode loop)" in text and "idled 64% of each step" in text, text
    # the GPU model comes from the engine's own steps, not one loaded point: 3.6 ms at batch 1, not 29 ms
    assert d.profiles.decode.gpu_step_time(1) == pytest.approx(0.0036, rel=0.05), text
    assert d.profiles.decode.max_running == 256 and d.fit.max_running == 256
    assert "MBU 60% of GPU-busy time, 21% of wall time" in text
    assert "a single request is slower" not in text
    # the host's time per step, measured at batch 1 and 256, grows with the batch: smaller batches on more
    # decode replicas hold the SLO
    assert d.profiles.decode.host_per_seq_s == pytest.approx((0.0187 - 0.0009) / 255, rel=0.02)
    assert d.best.num_decode > d.best.num_prefill and d.best.max_goodput_rps > 0, text


def test_the_front_end_and_the_router_are_named_when_ttft_goes_outside_the_prefill_pool():
    slow_router = [record(i / 4, 64, 2, 0.001, 0.01, 0.02, front=0.01) for i in range(40)]
    for r in slow_router:  # 1.5 s between the prefill result and the first token: routing, reservation, relay
        r.server["ttft_s"] += 1.5
        r.chunk_s = [c + 1.5 for c in r.chunk_s]
        r.e2e_s += 1.5
    d = diagnose(result([Run(4.0, None, 10.0, slow_router, pools(4500, [(1, 0.02)]))]))
    assert (d.bottleneck, d.host_part, d.phase) == ("host", "router", "prefill"), report(d)


def launch_bound_prefill_pools(gpu: float, launch: float) -> list[dict]:
    prefill = {"tokens_per_s": 12000, "queued_tokens": 1024, "queued_requests": 8, "gpu_batch_time_s": gpu,
               "launch_time_s": launch, "gpu_idle_share": 0.02, "batch_period_s": gpu + 0.0002}
    return [{"t": i, "pools": {"prefill": {"p0": prefill},
                               "decode": {"d0": {"batch_size": 4, "step_time_s": 0.005, "num_running": 4}}}}
            for i in range(5)]


def test_a_prefill_whose_kernels_wait_for_their_launches_is_host_bound():
    """The H200 probe of issue 17: a 128-token 8B prefill launched from Python took 10.7 ms, 10.5 of it
    launching (its kernels 5.3 ms): the GPU is busy by its clock, yet faster GPUs would not help."""
    queued = [record(i / 40, 128, 2, 1.2, 0.0107, 0.005) for i in range(80)]
    d = diagnose(result([Run(40.0, None, 2.0, queued, launch_bound_prefill_pools(0.0107, 0.0105))]))
    assert (d.bottleneck, d.host_part, d.phase) == ("host", "prefill launches", "prefill"), report(d)
    assert "10.7 ms on the GPU and 10.5 ms launching it" in report(d)
    graphed = diagnose(result([Run(40.0, None, 2.0, queued, launch_bound_prefill_pools(0.0056, 0.0004))]))
    assert graphed.bottleneck == "prefill", report(graphed)  # from its graph: the GPU's own time


def test_a_result_survives_its_json_round_trip():
    run = Run(2.0, 4, 5.0, [record(i, 16, 8, 0.0, 0.01, 0.01) for i in range(4)], pools(1000, [(1, 0.01)]))
    original = result([run])
    again = BenchResult.from_json(original.to_json())
    assert again.runs[0].requests == run.requests
    assert again.runs[0].summary(SLO) == run.summary(SLO)


def test_a_bench_where_every_request_failed_is_refused_with_the_first_error(tmp_path, capsys):
    from pdserve.cluster.cli import main
    from pdserve.cluster.bench.diagnose import NothingToDiagnose

    failed = [RequestRecord(i, 8, 16, error="HTTP 503: no decode replica") for i in range(3)]
    bench = result([Run(1.0, None, 3.0, failed, pools(1000, [(1, 0.01)]))])
    with pytest.raises(NothingToDiagnose, match="no request of the bench succeeded.*HTTP 503"):
        diagnose(bench)
    path = tmp_path / "bench.json"
    bench.save(path)
    assert main(["diagnose", "--from", str(path), "--out", str(tmp_path / "d")]) == 1
    assert "HTTP 503: no decode replica" in capsys.readouterr().err
    assert not (tmp_path / "d.json").exists()


def test_prefix_cache_hits_count_as_no_prefill_work():
    requests = [record(i / 4, 900, 2, 0.05, 0.1, 0.02) for i in range(40)]
    cold = diagnose(result([Run(4.0, None, 10.0, requests, pools(4500, [(1, 0.02)]))]))
    hot_pools = pools(4500, [(1, 0.02)])
    for sample in hot_pools:
        sample["pools"]["prefill"]["p0"]["prefix_hit_rate"] = 0.5
    hot = diagnose(result([Run(4.0, None, 10.0, requests, hot_pools)]))
    assert cold.workload.prefix_hit_rate == 0 and hot.workload.prefix_hit_rate == 0.5
    assert hot.points[0].prefill_utilisation == pytest.approx(cold.points[0].prefill_utilisation / 2)
    assert "50% from the prefix cache" in report(hot) and "prefix cache" not in report(cold)


def test_a_tp_decode_replica_counts_its_gpus_in_the_goodput_per_gpu():
    steps = [(4, 0.05), (8, 0.083), (16, 0.15)]
    runs = [Run(None, 16, 20.0, [record(i / 2, 4, 128, 0.001, 0.005, 0.15, front=0.3) for i in range(40)],
                pools(5000, steps))]
    tp1 = diagnose(result(runs))
    status = {**STATUS, "pools": {"prefill": {"p0": {"num_gpus": 1.0}}, "decode": {"d0": {"num_gpus": 2.0}}}}
    tp2 = diagnose(BenchResult({"status": status}, {}, SLO, runs))
    assert tp2.profiles.decode.num_gpus == 2.0 and tp2.current.num_gpus == 3.0
    same = next(s for s in tp2.splits if (s.num_prefill, s.num_decode) == (tp1.best.num_prefill, tp1.best.num_decode))
    assert same.max_goodput_rps == pytest.approx(tp1.best.max_goodput_rps)  # the same replicas, more GPUs each
    assert same.per_gpu_rps < tp1.best.per_gpu_rps
    assert "per GPU" in report(tp2)


def test_the_step_fit_leaves_out_windows_taken_while_the_batch_ramped_up():
    # Readings of an H200 run (2026-12-01, 8B colocated, 256 in flight): (window mean batch, running when
    # read, GPU step s, context per sequence). The ramp-up windows (15 of 120, 33 of 248) held graph
    # captures and read 11-19 ms; left in, they made the fit say 9.8 ms at batch 1 (the engine's own: 4.9).
    readings = [(12, 12, 0.00488, 312), (15, 120, 0.0113, 131), (33, 248, 0.0190, 135), (252, 252, 0.0094, 244),
                (252, 252, 0.0101, 345), (246, 205, 0.0113, 271), (237, 252, 0.0132, 151), (243, 252, 0.0088, 190)]
    decode = [{"batch_size": b, "num_running": n, "num_context_tokens": n * c, "step_time_s": g * 1.02,
               "gpu_step_time_s": g, "gpu_idle_share": 0.02, "max_running": 256, "num_blocks_total": 51171,
               "kv_block_size": 16, "engine_steps": [[1, 0.00486], [256, 0.0074]]} for b, n, g, c in readings]
    samples = [{"t": i, "pools": {"prefill": {"p0": {"tokens_per_s": 200000, "queued_tokens": 0}},
                                  "decode": {"d0": r}}} for i, r in enumerate(decode)]
    loaded = Run(None, 256, 20.0, [record(i / 20, 128, 256, 0.002, 0.01, 0.011) for i in range(64)], samples)
    d = diagnose(BenchResult({"status": STATUS}, {}, Slo(ttft_s=1.0, tpot_s=0.02), [loaded]))
    assert 15 not in d.fit.batch_sizes and 33 not in d.fit.batch_sizes and 12 in d.fit.batch_sizes
    assert d.profiles.decode.gpu_step_time(1) < 0.006, report(d)


def test_a_colocated_deployment_is_compared_with_its_predicted_split_per_gpu():
    """Colocated x1 holds 1 GPU; its 1:1 prediction is for 2: the report sets them side by side per GPU."""
    heavy = Run(4.0, None, 10.0, [record(i / 4, 900, 2, 1.5 + i / 40, 0.2, 0.02) for i in range(40)],
                pools(4500, [(1, 0.02), (2, 0.022)]))
    colocated = BenchResult({"status": {**STATUS, "colocated": True, "pools": {"decode": {"d0": {}}}}}, {}, SLO, [heavy])
    d = diagnose(colocated)
    measured = max(p.goodput_rps for p in d.points)
    assert (f"on {d.current.num_gpus:g} GPUs ({d.current.per_gpu_rps:.2f} per GPU); measured: best goodput "
            f"{measured:.2f} req/s on the 1 deployed ({measured:.2f} per GPU)") in report(d)
    assert d.current.num_gpus == 2


def colocated_pools(prefill_tokens_per_s: float) -> list[dict]:
    """A colocated replica's reports: decode steps, and its own prefill batches' rate."""
    return [{"t": i, "pools": {"decode": {"d0": {"batch_size": 16, "step_time_s": 0.02, "num_running": 16,
                                                 "prefill_tokens_per_s": prefill_tokens_per_s}}}} for i in range(4)]


def test_a_colocated_prefill_rate_is_its_batches_not_each_prompt_over_its_batch():
    # 16 prompts of 128 tokens prefilled in one 51 ms batch: each request's own prefill_s is the batch's,
    # so prompt / prefill_s reads 2.5k tokens/s; the replica's batches ran 40k
    requests = [record(i / 40, 128, 64, 0.01, 0.051, 0.012) for i in range(80)]
    status = {"status": {**STATUS, "colocated": True, "pools": {"decode": {"d0": {}}}}}
    reported = diagnose(BenchResult(status, {}, SLO, [Run(None, 16, 2.0, requests, colocated_pools(40_000))]))
    older = diagnose(BenchResult(status, {}, SLO, [Run(None, 16, 2.0, requests, colocated_pools(0))]))
    assert reported.profiles.prefill.tokens_per_s == pytest.approx(40_000)
    assert older.profiles.prefill.tokens_per_s == pytest.approx(128 / 0.051)
    assert reported.current.max_goodput_rps > older.current.max_goodput_rps
