"""Driving a prefill + decode worker pair by hand, and the engine's own tokens to compare with."""
import threading
import time

from pdserve.decode_worker.outbox import Outbox, TokenBatch
from pdserve.engine.messages import PrefillRequest, SamplingParams, StreamStart
from pdserve.engine.offline import OfflineEngine, OfflineSequence


def run_request(prefill, decode, prompt, max_tokens, params=SamplingParams(), stop_ids=frozenset(),
                stream_interval=1, sizes=None):
    """The request's tokens, prefilled on `prefill` and decoded on `decode`; `sizes`, a list given,
    gets how many tokens each message from the decode replica carried."""
    deadline = time.time() + 60
    reservation = decode.reserve("r", len(prompt), max_tokens, deadline)
    request = PrefillRequest("r", tuple(prompt), params, reservation.destination, deadline, stop_ids)
    result = prefill.submit(request).result(timeout=60)
    batches: list[TokenBatch] = []
    done = threading.Event()

    def deliver(batch: TokenBatch):
        batches.append(batch)
        if batch.endings:
            done.set()

    start = StreamStart(reservation.transfer_id, "r", tuple(prompt), (result.first_token,), False, max_tokens,
                        params, stop_ids, deadline, stream_interval)
    decode.open(start, Outbox(deliver))
    assert done.wait(60)
    ending = batches[-1].endings[-1]
    assert ending.error is None and ending.transfer_id == reservation.transfer_id, ending.error
    assert {t for b in batches for t in b.transfer_ids} <= {reservation.transfer_id}
    if sizes is not None:
        sizes += [len(b.token_ids) for b in batches if b.token_ids]
    return [result.first_token] + [t for b in batches for t in b.token_ids]


def engine_outputs(loaded, requests) -> list[list[int]]:
    """The engine's own greedy tokens for each (prompt, max_tokens), one request at a time."""
    engine = OfflineEngine(loaded, num_blocks=512, block_size=4)
    outputs = []
    for prompt, max_tokens in requests:
        seq = OfflineSequence(prompt, max_tokens)
        list(engine.generate([seq], ignore_eos=True))
        outputs.append(seq.output)
    return outputs


def run_all_at_once(prefill, decode, requests, stop_ids=None) -> list[list[int]]:
    """`run_request` for every (prompt, max_tokens) at the same time, each on its own thread."""
    results = [None] * len(requests)

    def one(i):
        prompt, max_tokens = requests[i]
        results[i] = run_request(prefill, decode, prompt, max_tokens, stop_ids=stop_ids[i] if stop_ids else frozenset())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results
