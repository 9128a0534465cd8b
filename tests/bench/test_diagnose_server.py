"""`pdserve diagnose` on deliberately unbalanced deployments: the right phase, or the host, and the ratio moved its way."""
import asyncio
import json
import time

import pytest

from pdserve.cluster import cli
from pdserve.cluster.bench.client import HttpClient
from pdserve.cluster.bench.diagnose import diagnose, report
from pdserve.cluster.bench.run import BenchConfig, run_bench
from pdserve.cluster.bench.stats import Slo
from pdserve.cluster.bench.workload import LengthRange, Workload

pytestmark = pytest.mark.e2e

WORKLOADS = {
    # long prompts, one decode step: the prefill replica queues, the decode replica idles. 16 at once:
    # the queue's TTFT then dwarfs what CPU contention adds to the decode step on a 2-core machine
    "prefill": ["--prompt-tokens", "900", "--output-tokens", "2", "--concurrency", "16", "--num-requests", "32",
                "--slo-ttft-ms", "1000"],
    # 4-token prompts, long answers, many at once: the decode batch grows, prefill idles
    # (its TTFT SLO leaves room for what 16 streams cost the HTTP proxy on a 2-core machine, up to a second:
    # the question here is TPOT's)
    "decode": ["--prompt-tokens", "4", "--output-tokens", "128", "--concurrency", "16", "--num-requests", "32",
               "--slo-ttft-ms", "5000"],
}


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_diagnose_names_the_bottleneck_and_moves_the_ratio_its_way(one_and_one, tmp_path, phase, capsys):
    out = tmp_path / phase
    assert cli.main(["diagnose", "--url", one_and_one.url, "--rates", "inf", *WORKLOADS[phase], "--warmup", "2",
                     "--slo-tpot-ms", "100", "-q", "--out", str(out), "--confirm"]) == 0
    text = capsys.readouterr().out
    diagnosis = json.loads((tmp_path / f"{phase}.json").read_text())
    assert diagnosis["bottleneck"] == phase, text
    assert f"Bottleneck: {phase.upper()}" in text or f"the closest is {phase.upper()}" in text
    best = diagnosis["best"]
    more, fewer = ("num_prefill", "num_decode") if phase == "prefill" else ("num_decode", "num_prefill")
    assert best[more] > best[fewer], text
    assert best["max_goodput_rps"] > diagnosis["baseline"]["max_goodput_rps"], text
    assert (tmp_path / f"{phase}.png").stat().st_size > 10_000
    assert (tmp_path / f"{phase}-bench.json").exists()
    # --confirm offered the deployment as it is the rate the model predicts for it, and measured it
    confirmation = diagnosis["confirmation"]
    assert confirmation["offered_rps"] == pytest.approx(diagnosis["current"]["max_goodput_rps"])
    assert confirmation["throughput_rps"] > 0 and confirmation["num_failed"] == 0, confirmation
    assert "Confirm: offered the predicted" in text


class BusyClient(HttpClient):
    """A real HTTP client whose own event loop is too busy: it blocks 50 ms on every streamed event it reads."""

    def take_event(self, event, record, at):
        time.sleep(0.05)
        super().take_event(event, record, at)


def test_a_client_too_busy_to_read_its_streams_reads_host_and_names_the_client(one_and_one):
    config = BenchConfig(url=one_and_one.url, workload=Workload(LengthRange(8, 8), LengthRange(24, 24)),
                         num_requests=8, concurrency=4, warmup=0, slo=Slo(1.0, 0.05), progress=False)
    result = asyncio.run(run_bench(config, BusyClient(one_and_one.url)))
    d = diagnose(result)
    text = report(d)
    assert d.bottleneck == "host" and d.host_part == "client", text
    point = d.points[0]
    assert point.tpot_p90_s >= 2 * point.server_tpot_p90_s and point.client_lag_s >= 0.005, text
    assert "Bottleneck: HOST (client)" in text and "faster GPUs will not help" in text
