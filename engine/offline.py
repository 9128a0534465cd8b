"""Generation in one process, no Ray: the engine's simplest user.

Prefills a batch of prompts in one packed step, then decodes them together until
each stops. `pdserve generate --offline` and the engine tests use it; serving
uses the prefill and decode workers instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from .block_pool import BlockPool, BlockTable
from .loader import LoadedModel
from .parallel import TensorParallel
from .penalties import penalties_from_tokens
from .runner import DecodeInput, ModelRunner, PrefillChunk
from .sampler import SamplingParams, sample


@dataclass
class OfflineSequence:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    output: list[int] = field(default_factory=list)
    is_finished: bool = False


class OfflineEngine:
    def __init__(self, loaded: LoadedModel, num_blocks: int = 512, block_size: int = 16,
                 kv_cache_dtype: str = "auto", tp: TensorParallel | None = None):
        """`tp`: this rank's group when every rank of a TP group runs the same generation."""
        self.runner = ModelRunner(loaded, num_blocks, block_size, kv_cache_dtype=kv_cache_dtype, tp=tp)
        self.pool = BlockPool(num_blocks, block_size)
        self.eos_ids = set(loaded.spec.eos_token_ids)
        self.kv_window = loaded.spec.kv_window
        self.num_blocks_returned = 0  # blocks given back early: wholly outside every layer's window

    def generate(self, sequences: list[OfflineSequence], ignore_eos: bool = False) -> Iterator[tuple[int, int]]:
        """Yields (sequence index, token id) as tokens are produced; fills each `output`."""
        tables = [BlockTable(self.pool) for _ in sequences]
        try:
            for seq, table in zip(sequences, tables):
                table.ensure_capacity(len(seq.prompt) + seq.max_tokens)
            chunks = [PrefillChunk(tuple(s.prompt), 0, tuple(t.block_ids)) for s, t in zip(sequences, tables)]
            logits = self.runner.prefill(chunks)
            yield from self._accept(sequences, list(range(len(sequences))), logits, ignore_eos)
            while active := [i for i, s in enumerate(sequences) if not s.is_finished]:
                self._return_old_blocks(sequences, tables)
                inputs = [DecodeInput(sequences[i].output[-1], len(sequences[i].prompt) + len(sequences[i].output) - 1,
                                      tuple(tables[i].block_ids)) for i in active]
                logits = self.runner.decode(inputs)
                yield from self._accept(sequences, active, logits, ignore_eos)
        finally:
            for table in tables:
                table.release()

    def _return_old_blocks(self, sequences: list[OfflineSequence], tables: list[BlockTable]) -> None:
        """The next step's query (the last token, at position n - 1) sees from n - window on."""
        if self.kv_window is None:
            return
        for seq, table in zip(sequences, tables):
            if not seq.is_finished:
                num_tokens = len(seq.prompt) + len(seq.output)
                self.num_blocks_returned += table.release_before(num_tokens - self.kv_window)

    def _accept(self, sequences, rows, logits, ignore_eos) -> Iterator[tuple[int, int]]:
        params = [sequences[i].params for i in rows]
        positions = [len(sequences[i].prompt) + len(sequences[i].output) for i in rows]
        stop_ids = frozenset() if ignore_eos else frozenset(self.eos_ids)
        # Each step's histories from the host's tokens: simple, and this loop reads every step anyway.
        adjustments = penalties_from_tokens(params, [sequences[i].prompt for i in rows],
                                            [sequences[i].output for i in rows], [stop_ids] * len(rows),
                                            logits.shape[1], logits.device)
        result = sample(logits, params, positions, adjustments)
        for i, token in zip(rows, result.token_ids):
            seq = sequences[i]
            seq.output.append(token)
            seq.is_finished = len(seq.output) >= seq.max_tokens or (not ignore_eos and token in self.eos_ids)
            yield i, token
