"""A decode replica that prefills locally (colocated) reports its own queue and prefill time."""
import time

from test_worker_failures import PROMPT, Stream, make_decode, start


def test_a_local_prefill_reports_its_queue_and_prefill_time(loaded):
    decode = make_decode(loaded, receiver=False)
    try:
        stream = Stream()
        reservations = [decode.reserve(f"r{i}", len(PROMPT), 8, time.time() + 60) for i in range(3)]
        opened = time.monotonic()
        for reservation in reservations:
            decode.open(start(reservation, PROMPT, 8, local=True), stream.outbox)
        timings = [stream.ending(r.transfer_id).timings for r in reservations]
        waited = time.monotonic() - opened
        for t in timings:  # opened -> prefill started, then the prefill up to its first token
            assert 0 <= t["queue_s"] and 0 < t["prefill_s"] and t["queue_s"] + t["prefill_s"] <= waited
    finally:
        decode.close()
