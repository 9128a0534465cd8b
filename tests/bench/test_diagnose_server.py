"""`pdserve diagnose` on deliberately unbalanced workloads names the right phase and moves the P:D ratio its way."""
import json

import pytest

from pdserve.cluster import cli

pytestmark = pytest.mark.e2e

WORKLOADS = {
    # long prompts, one decode step: the prefill replica queues, the decode replica idles. 16 at once:
    # the queue's TTFT then dwarfs what CPU contention adds to the decode step on a 2-core machine
    "prefill": ["--prompt-tokens", "900", "--output-tokens", "2", "--concurrency", "16", "--num-requests", "32"],
    # 4-token prompts, long answers, many at once: the decode batch grows, prefill idles
    "decode": ["--prompt-tokens", "4", "--output-tokens", "128", "--concurrency", "16", "--num-requests", "32"],
}


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_diagnose_names_the_bottleneck_and_moves_the_ratio_its_way(one_and_one, tmp_path, phase, capsys):
    out = tmp_path / phase
    assert cli.main(["diagnose", "--url", one_and_one.url, "--rates", "inf", *WORKLOADS[phase], "--warmup", "2",
                     "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100", "-q", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    diagnosis = json.loads((tmp_path / f"{phase}.json").read_text())
    assert diagnosis["bottleneck"] == phase, report
    assert f"Bottleneck: {phase.upper()}" in report or f"the closest is {phase.upper()}" in report
    best = diagnosis["best"]
    more, fewer = ("num_prefill", "num_decode") if phase == "prefill" else ("num_decode", "num_prefill")
    assert best[more] > best[fewer], report
    assert best["max_goodput_rps"] > diagnosis["baseline"]["max_goodput_rps"], report
    assert (tmp_path / f"{phase}.png").stat().st_size > 10_000
    assert (tmp_path / f"{phase}-bench.json").exists()
