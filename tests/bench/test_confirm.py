"""When `diagnose --confirm` offers the rate again: only when the client, not the server, fell short."""
from pdserve.cluster.bench.confirm import Confirmation, more_processes


def checked(goodput_rps: float, client_lag_s: float, processes: int) -> Confirmation:
    return Confirmation(offered_rps=10.0, goodput_rps=goodput_rps, throughput_rps=goodput_rps, ttft_p90_s=0.1,
                        tpot_p90_s=0.01, num_failed=0, client_lag_s=client_lag_s, processes=processes)


def test_a_short_run_with_a_busy_client_is_offered_again_with_twice_the_processes():
    assert more_processes(checked(3.0, 0.050, 1), cpus=16) == 2
    assert more_processes(checked(3.0, 0.050, 4), cpus=16) == 8


def test_a_run_stands_when_it_held_when_the_client_kept_up_or_when_the_cpus_run_out():
    assert more_processes(checked(9.5, 0.050, 1), cpus=16) is None  # confirmed
    assert more_processes(checked(3.0, 0.001, 1), cpus=16) is None  # the server fell short
    busy = checked(3.0, 0.050, 8)
    assert more_processes(busy, cpus=8) is None
    assert "as many as this machine's CPUs allow" in "\n".join(busy.lines())
