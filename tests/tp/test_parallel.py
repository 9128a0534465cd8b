"""TensorParallel over real gloo process groups in separate processes."""
import torch

from pdserve.engine.parallel import TensorParallel
from rank_bodies import collectives, idle_follower, one_rank_dies
from ranks import run_ranks


def test_a_group_of_one_is_a_no_op():
    tp = TensorParallel.single()
    x = torch.ones(2)
    assert tp.all_reduce(x) is x and tp.broadcast("step") == "step" and tp.all_gather(x) is x


def test_collectives_over_two_ranks():
    results = run_ranks(collectives, 2)
    for result in results:
        assert result["sum"] == [3.0, 3.0, 3.0]
        assert result["gathered"] == [[0, 10, 1, 11]]
        assert result["command"] == {"step": 7, "rows": [1, 2, 3]}


def test_a_dead_rank_ends_the_collective_of_its_peer():
    survivor = run_ranks(one_rank_dies, 2, collective_timeout_s=5.0)[0]  # rank 1's result: its exit
    assert survivor.startswith("raised"), survivor


def test_an_idle_follower_waits_past_the_collective_timeout_for_the_next_step():
    assert run_ranks(idle_follower, 2, collective_timeout_s=1.0) == [("step", 1), ("step", 1)]
