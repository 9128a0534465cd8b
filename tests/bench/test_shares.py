"""How `pdserve bench --processes N` splits a run: the shares add up to the run, the first is a lone client's."""
import pytest

from pdserve.cluster.bench.run import BenchConfig, _shares


@pytest.mark.parametrize("requests,rate,concurrency,processes", [(14, 12.0, None, 3), (100, None, 10, 4), (5, 3.0, 2, 8)])
def test_shares_add_up_to_the_run(requests, rate, concurrency, processes):
    config = BenchConfig(num_requests=requests, concurrency=concurrency, processes=processes)
    shares = _shares(config, 0, rate)
    assert len(shares) == min(processes, requests, concurrency or requests)
    assert sum(s.num_requests for s in shares) == requests
    assert max(s.num_requests for s in shares) - min(s.num_requests for s in shares) <= 1
    if rate is not None:
        assert sum(s.rate for s in shares) == pytest.approx(rate)
    if concurrency is not None:
        assert sum(s.concurrency for s in shares) == concurrency and min(s.concurrency for s in shares) >= 1
    assert len({s.seed for s in shares}) == len(shares)


def test_one_process_is_seeded_as_before():
    config = BenchConfig(num_requests=10, seed=7)
    assert [(s.num_requests, s.rate, s.seed) for s in _shares(config, 2, 4.0)] == [(10, 4.0, 11)]
