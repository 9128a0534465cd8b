"""The decode replica's memory of Reserve calls: served ones release to their transfer, released
ones refuse their call when it comes, and both are forgotten after `keep_s`."""
import time

from pdserve.decode_worker.reserve_calls import ReserveCalls


def test_a_served_call_releases_to_its_transfer_once():
    calls = ReserveCalls()
    calls.served("a", 7)
    assert calls.release("a") == 7
    assert not calls.is_released("a")  # served, then released: nothing left to refuse


def test_a_call_released_before_it_came_is_refused_once():
    calls = ReserveCalls()
    assert calls.release("b") is None
    assert calls.is_released("b") and not calls.is_released("b")
    assert not calls.is_released("")  # calls without an id are never refused


def test_old_ids_are_forgotten():
    calls = ReserveCalls(keep_s=0.05)
    calls.served("old", 1)
    calls.release("gone-before")
    time.sleep(0.1)
    calls.served("new", 2)
    assert calls.release("old") is None  # forgotten (and now remembered as released)
    assert not calls.is_released("gone-before")
    assert calls.release("new") == 2
