"""Local prefill batches stay within what a CUDA graph replays, when they started there (decode_worker/steps.py)."""
from pdserve.decode_worker.sequence import DecodeSequence
from pdserve.decode_worker.steps import prefill_chunks
from pdserve.engine.block_pool import BlockPool, BlockTable


def prefilling(lengths: list[int]) -> list[DecodeSequence]:
    pool = BlockPool(256, 16)
    seqs = []
    for i, n in enumerate(lengths):
        table = BlockTable(pool)
        table.ensure_capacity(n)
        seqs.append(DecodeSequence(f"r{i}", i, table, n, 4, deadline=1e18, prompt=list(range(1, n + 1))))
    return seqs


def graph_of(max_seqs: int, max_tokens: int):
    """What a runner with prefill graphs of these sizes holds: prompts from position 0 within them."""
    def holds(chunks) -> bool:
        return (all(c.start_pos == 0 for c in chunks) and len(chunks) <= max_seqs
                and sum(len(c.token_ids) for c in chunks) <= max_tokens)
    return holds


def test_a_batch_a_graph_holds_takes_no_prompt_that_would_make_it_eager():
    batch = prefill_chunks(prefilling([100, 100, 100, 300, 50]), 2048, graph_of(8, 512))
    assert [len(c.token_ids) for _, c in batch] == [100, 100, 100]


def test_without_graphs_the_budget_alone_decides():
    batch = prefill_chunks(prefilling([100, 100, 100, 300, 50]), 2048, lambda chunks: False)
    assert [len(c.token_ids) for _, c in batch] == [100, 100, 100, 300, 50]


def test_a_prompt_no_graph_holds_runs_with_what_follows_under_the_budget():
    batch = prefill_chunks(prefilling([900, 100, 100]), 1000, graph_of(8, 512))
    assert [len(c.token_ids) for _, c in batch] == [900, 100]
