"""`diagnose --confirm`'s judgement: requests within both SLOs at the offered rate, sent on time, for long enough."""
import math

import pytest

from pdserve.cluster import cost_model as cm
from pdserve.cluster.bench.confirm import STEADY_LIVES, Confirmation, more_processes, steady_requests
from pdserve.cluster.bench.diagnose import diagnose
from pdserve.cluster.bench.result import Run

from test_diagnose import pools, record, result


def checked(attainment: float, client_lag_s: float, processes: int) -> Confirmation:
    return Confirmation(offered_rps=10.0, slo_attainment=attainment, num_requests=300, throughput_rps=7.0,
                        ttft_p90_s=0.1, tpot_p90_s=0.01, num_failed=0, client_lag_s=client_lag_s, processes=processes)


def test_the_rate_holds_when_nine_in_ten_requests_meet_both_slos_whatever_the_drain_costs_the_throughput():
    held = checked(0.96, 0.001, 6)
    assert held.confirmed and held.goodput_rps == pytest.approx(9.6)
    assert "96% met both SLOs" in held.lines()[0] and "is confirmed" in held.lines()[0]
    assert not checked(0.85, 0.001, 6).confirmed


def test_a_client_that_lagged_confirms_nothing_and_is_offered_again_with_twice_the_processes():
    lagged = checked(1.0, 0.050, 1)  # it sent late: the server saw less than the rate
    assert not lagged.confirmed
    assert more_processes(lagged, cpus=16) == 2
    assert more_processes(checked(0.3, 0.050, 4), cpus=16) == 8


def test_a_run_stands_when_the_client_kept_up_or_when_the_cpus_run_out():
    assert more_processes(checked(0.96, 0.001, 1), cpus=16) is None
    assert more_processes(checked(0.30, 0.001, 1), cpus=16) is None  # the server fell short
    busy = checked(0.30, 0.050, 8)
    assert more_processes(busy, cpus=8) is None
    assert "as many as this machine's CPUs allow" in "\n".join(busy.lines())


def test_the_offered_run_outlasts_a_request_s_predicted_life_several_times():
    # 128-token answers at tens of ms a token: a request lives seconds, so 20 requests at the predicted rate
    # would all arrive before the first ended
    steps = [(4, 0.05), (8, 0.06), (16, 0.07)]
    loaded = Run(None, 16, 20.0, [record(i / 2, 4, 128, 0.001, 0.005, 0.06) for i in range(40)], pools(5000, steps))
    d = diagnose(result([loaded]))
    rate = d.current.max_goodput_rps
    at = cm.predict(cm.Workload(rate, d.workload.prompt_tokens, d.workload.output_tokens),
                    max(d.num_prefill, 1), d.num_decode, d.profiles, d.slo)
    life_s = at.ttft_s + at.tpot_s * (d.workload.output_tokens - 1)
    assert rate > 0 and life_s > 1.0
    needed = steady_requests(d, 20)
    assert needed == math.ceil(rate * STEADY_LIVES * life_s) > 20
    assert steady_requests(d, 10 * needed) == 10 * needed  # never fewer than asked
