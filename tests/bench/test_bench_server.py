"""`pdserve bench` against a real server: the JSON has every metric, goodput stays within throughput."""
import json

import pytest

from pdserve.cluster import cli

pytestmark = pytest.mark.e2e

LATENCIES = ("ttft", "tpot", "itl", "e2e")


def test_bench_over_http_sweeps_rates_and_writes_json_and_plots(one_and_one, tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--url", one_and_one.url, "--rates", "4,8", "--num-requests", "12", "--warmup", "2",
                     "--prompt-tokens", "16:64", "--output-tokens", "8", "-q", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [run["rate"] for run in data["runs"]] == [4.0, 8.0]
    for run in data["runs"]:
        summary = run["summary"]
        assert summary["num_ok"] == 12 and summary["num_failed"] == 0
        for name in LATENCIES:
            assert 0 < summary[name]["p50"] <= summary[name]["p90"] <= summary[name]["p99"]
        assert 0 <= summary["goodput_rps"] <= summary["throughput_rps"]
        assert summary["server"]["prefill_s"]["count"] == 12  # the server's phase timings came back
        for request in run["requests"]:
            assert request["output_tokens"] == request["max_tokens"] == 8  # ignore_eos: exact lengths
            assert 16 <= request["prompt_tokens"] <= 64
            assert request["server"]["kv_bytes"] > 0 and request["server"]["decode_replica"]
        assert run["pools"], "the pools' reports were sampled while the run went"
    for plot in ("bench-latency.png", "bench-goodput.png"):
        assert (tmp_path / plot).stat().st_size > 10_000


def test_bench_over_grpc_with_impossible_slos_has_zero_goodput(one_and_one, tmp_path):
    out = tmp_path / "grpc.json"
    assert cli.main(["bench", "--url", one_and_one.url, "--grpc", one_and_one.grpc_address, "--num-requests", "6",
                     "--concurrency", "3", "--warmup", "0", "--output-tokens", "4", "--slo-ttft-ms", "0.001",
                     "--slo-tpot-ms", "0.001", "-q", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["runs"][0]["summary"]
    assert summary["num_ok"] == 6 and summary["throughput_rps"] > 0
    assert summary["goodput_rps"] == 0 and summary["slo_attainment"] == 0
    assert summary["output_tokens_per_s"] == pytest.approx(4 * summary["throughput_rps"])


def test_bench_shares_a_run_among_client_processes(one_and_one, tmp_path):
    out = tmp_path / "shared.json"
    assert cli.main(["bench", "--url", one_and_one.url, "--processes", "3", "--rates", "12", "--num-requests", "14",
                     "--warmup", "1", "--output-tokens", "4", "-q", "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["summary"]["num_ok"] == 14 and run["rate"] == pytest.approx(12.0)
    assert sorted({r["client"] for r in run["requests"]}) == [0, 1, 2]
    assert sorted(sum(r["client"] == k for r in run["requests"]) for k in range(3)) == [4, 5, 5]
    assert run["pools"], "this process sampled the pools"
    assert 0 < run["duration_s"] < 60
