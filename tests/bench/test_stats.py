"""The bench's numbers on synthetic records: percentiles, TPOT/ITL, goodput against throughput."""
import math
import random

import pytest

from pdserve.cluster.bench.client import RequestRecord
from pdserve.cluster.bench.stats import Latency, Slo, meets_slo, percentile, summarize
from pdserve.cluster.bench.workload import LengthRange, Workload, arrival_times


def record(ttft: float, tpot: float, tokens: int = 11, error: str | None = None) -> RequestRecord:
    """A finished request: first token at `ttft`, one token per chunk every `tpot` after it."""
    chunks = [ttft + i * tpot for i in range(tokens)]
    return RequestRecord(sent_at=0.0, max_tokens=tokens, prompt_tokens=100, output_tokens=tokens, chunk_s=chunks,
                         e2e_s=chunks[-1], error=error)


def test_percentile_interpolates_linearly_like_numpy():
    values = sorted(random.Random(1).random() for _ in range(101))
    numpy = pytest.importorskip("numpy")
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([3.0], 99) == 3.0


def test_latency_of_nothing_is_empty_not_an_error():
    assert Latency.of([]) == Latency(None, None, None, None, 0)


def test_record_derives_ttft_tpot_and_itl():
    r = record(ttft=0.5, tpot=0.1, tokens=11)
    assert r.ttft_s == 0.5
    assert r.tpot_s == pytest.approx(0.1)
    assert r.itl_s == pytest.approx([0.1] * 10)
    assert record(0.5, 0.1, tokens=1).tpot_s is None  # one token: no TPOT


def test_goodput_counts_requests_meeting_both_slos():
    slo = Slo(ttft_s=1.0, tpot_s=0.05)
    records = [record(0.2, 0.01), record(0.2, 0.01),  # good
               record(2.0, 0.01),  # TTFT broken
               record(0.2, 0.2),  # TPOT broken
               record(0.2, 0.01, error="HTTP 503")]  # failed
    summary = summarize(records, duration_s=2.0, slo=slo, rate=2.0, concurrency=None)
    assert summary.num_ok == 4 and summary.num_failed == 1 and summary.num_good == 2
    assert summary.throughput_rps == pytest.approx(2.0)
    assert summary.goodput_rps == pytest.approx(1.0)
    assert summary.slo_attainment == pytest.approx(0.4)
    assert summary.output_tokens_per_s == pytest.approx(4 * 11 / 2.0)
    assert summary.ttft.p50 == pytest.approx(0.2)


def test_one_token_answers_meet_the_tpot_slo_vacuously():
    assert meets_slo(record(0.2, 0.0, tokens=1), Slo(1.0, 0.001))
    assert not meets_slo(record(1.2, 0.0, tokens=1), Slo(1.0, 0.001))


def test_goodput_never_exceeds_throughput_and_is_zero_for_impossible_slos():
    rng = random.Random(3)
    records = [record(rng.uniform(0.01, 2), rng.uniform(0.001, 0.2), tokens=rng.randint(1, 30)) for _ in range(200)]
    records += [record(0.01, 0.001, error="boom") for _ in range(20)]  # fast but failed: never good, never done
    for slo in (Slo(0.5, 0.05), Slo(5, 5), Slo(1e-9, 1e-9)):
        s = summarize(records, duration_s=10.0, slo=slo, rate=None, concurrency=8)
        assert s.goodput_rps <= s.throughput_rps
    assert summarize(records, 10.0, Slo(1e-9, 1e-9), None, 8).goodput_rps == 0
    assert summarize(records, 10.0, Slo(math.inf, math.inf), None, 8).goodput_rps == pytest.approx(20.0)


def test_workload_is_reproducible_and_within_its_ranges():
    workload = Workload(LengthRange.parse("4:8"), LengthRange.parse("16"))
    first, again = workload.requests(50, seed=5), workload.requests(50, seed=5)
    assert first == again
    assert all(4 <= len(r.prompt) <= 8 and r.max_tokens == 16 for r in first)


def test_poisson_arrivals_have_the_asked_rate():
    times = arrival_times(4000, rate=20.0, seed=0)
    assert times[0] == 0 and times == sorted(times)
    assert 4000 / times[-1] == pytest.approx(20.0, rel=0.05)
    assert arrival_times(3, None, seed=0) == [0.0, 0.0, 0.0]


def test_a_shared_prefix_starts_every_prompt_and_adds_to_its_length():
    workload = Workload(LengthRange(5, 9), LengthRange(3, 3), shared_prefix_tokens=32)
    specs = workload.requests(20, seed=1)

    assert all(spec.prompt[:32] == specs[0].prompt[:32] for spec in specs)
    assert all(37 <= len(spec.prompt) <= 41 for spec in specs)
    assert len({tuple(spec.prompt[32:]) for spec in specs}) > 1
    assert workload.describe()["shared_prefix_tokens"] == 32
    with pytest.raises(ValueError, match="shared prefix"):
        Workload(shared_prefix_tokens=-1)
