"""The model runner: turns scheduled sequences into tensors and runs one step.

The schedulers (prefill and decode workers) see sequences and integer block ids;
only the runner builds tensors. It owns the model and the replica's KV cache.

`decode_and_sample` queues a step and its sampling without waiting for either: a
caller may queue step N+1 before step N's tokens reach the host, naming the rows
of step N whose sampled tokens step N+1 takes as inputs (`DecodeInput.source`);
the tokens move on the device. The host then prepares each step while the GPU
runs the one before, and a step takes the GPU's time. Likewise the token histories
that penalties read (`TokenCounts`, engine/penalties.py) count each sampled token on
the device, before it reaches the host.

On CUDA, decode steps replay CUDA graphs (engine/cuda_graphs.py), one per padded
batch size up to `max_decode_batch`, and so does a prefill of a few short prompts
with no cached prefix (engine/prefill_graphs.py, up to `max_graph_prefill_tokens`
in all, up to 8 prompts); other prefills and the CPU path run eagerly. The graphs' padding rows write their
K/V into one scratch block past the pool: the KV tensor then holds num_blocks + 1
blocks, and `kv_cache.spec.num_blocks` (what the block pools and transfers see)
stays num_blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .cuda_graphs import DecodeGraphs
from .prefill_graphs import PrefillGraphs
from .kv_cache import KvCache, KvCacheSpec, kv_dtype
from .loader import LoadedModel
from .model import DecodeAttention, LayerHook, Model, PrefillAttention
from .parallel import TensorParallel
from .copies import host_to_device, on_device
from .penalties import RowHistory, TokenCounts, penalties
from .sampler import PendingSample, SamplingParams, fed_back_tokens, sample_async


GRAPH_PREFILL_SEQS = 8  # prompts per prefill graph: a batch of more runs eagerly


@dataclass(frozen=True)
class PrefillChunk:
    """New tokens of one sequence; `start_pos` tokens of it are already in the cache."""

    token_ids: tuple[int, ...]
    start_pos: int
    block_ids: tuple[int, ...]  # enough blocks for start_pos + len(token_ids) tokens
    scores_prompt: bool = False  # logits for every position (prompt logprobs), not only the last


class DecodeInput(NamedTuple):
    """One sequence's row of a decode step. A NamedTuple, not a dataclass: the decode loop
    builds one per sequence every step, and a NamedTuple builds in a third of the time."""

    token_id: int  # the last token, whose K and V this step writes (ignored when `source` >= 0)
    position: int
    block_ids: tuple[int, ...]  # pass the same tuple while the blocks don't change (see DecodeGraphs)
    source: int = -1  # >= 0: the last token is the one sampled for this row of the previous step


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int,
                 max_decode_batch: int = 64, use_cuda_graphs: bool | None = None, kv_cache_dtype: str = "auto",
                 tp: TensorParallel | None = None, max_graph_prefill_tokens: int = 512):
        """`use_cuda_graphs`: None means on CUDA (and a TP group graphs can hold); graphs cover decode
        batches up to `max_decode_batch` and prefills of up to 8 prompts from position 0 and
        `max_graph_prefill_tokens` in all (0: none). `kv_cache_dtype`: 'auto' (the model's) or 'fp8_e4m3'
        (engine/kv_cache.py). `tp`: this rank's TP group, `loaded` its shard."""
        self.model = Model(loaded, tp)
        self.tp = self.model.tp
        self.spec = loaded.spec
        self.device = loaded.device
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the GPU current now, named
            self.device = torch.device("cuda", torch.cuda.current_device())
        use_graphs = (loaded.device.type == "cuda" and self.tp.can_capture_graphs if use_cuda_graphs is None
                      else use_cuda_graphs)
        kv_spec = KvCacheSpec(
            num_layers=loaded.spec.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=loaded.layout.num_kv_heads,  # this rank's kv heads only
            head_dim=loaded.spec.head_dim,
            dtype=kv_dtype(kv_cache_dtype, loaded.dtype),
            device=loaded.device,
        )
        self.kv_cache = KvCache(kv_spec, num_scratch_blocks=1 if use_graphs else 0,  # block num_blocks: graphs' scratch
                                scales=loaded.weights.kv_scales if kv_spec.is_fp8 else None)  # the checkpoint's
        self.block_size = block_size
        self.decode_graphs = DecodeGraphs(
            self.model, self.kv_cache, max_decode_batch,
            max_blocks=-(-loaded.spec.max_model_len // block_size), scratch_slot=num_blocks * block_size,
        ) if use_graphs else None
        self.prefill_graphs = PrefillGraphs(
            self.model, self.kv_cache, max_graph_prefill_tokens, GRAPH_PREFILL_SEQS,
            scratch_slot=num_blocks * block_size,
        ) if use_graphs and max_graph_prefill_tokens > 0 else None
        self._sampled: torch.Tensor | None = None  # the last decode_and_sample's tokens, on the device
        self.token_counts = TokenCounts(loaded.spec.vocab_size, self.device)  # the decode rows' histories

    def bind_thread(self) -> None:
        """Make this runner's GPU the calling thread's current device (CUDA keeps one per thread)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk], on_layer_done: LayerHook | None = None) -> torch.Tensor:
        """Logits of each chunk's last token, [len(chunks), vocab], or of every token of a chunk that
        `scores_prompt` (`logit_rows` says which rows are whose); KV written to the blocks.

        `on_layer_done(i)` runs once layer i's KV is written (a graph replay: after the whole prefill)."""
        logits = self._prefill_from_graph(chunks)
        if logits is not None:
            if on_layer_done is not None:
                for layer in range(self.spec.num_layers):
                    on_layer_done(layer)
            return logits
        starts, lens, columns = [], [], []
        for chunk in chunks:  # [3, n] host rows per chunk: tokens, positions, slots
            starts.append(sum(lens))
            lens.append(len(chunk.token_ids))
            span = torch.arange(chunk.start_pos, chunk.start_pos + len(chunk.token_ids))
            blocks = torch.tensor(chunk.block_ids, dtype=torch.long)
            slots = blocks[span // self.block_size] * self.block_size + span % self.block_size
            columns.append(torch.stack([torch.tensor(chunk.token_ids, dtype=torch.long), span, slots]))
        tokens, positions, slots = host_to_device(torch.cat(columns, dim=1), self.device)  # one copy, no sync
        attention = PrefillAttention(
            q_starts=tuple(starts),
            q_lens=tuple(lens),
            context_lens=tuple(c.start_pos + len(c.token_ids) for c in chunks),
            block_tables=tuple(c.block_ids for c in chunks),
        )
        rows = [r for chunk, s, n in zip(chunks, starts, lens)
                for r in (range(s, s + n) if chunk.scores_prompt else (s + n - 1,))]
        return self.model.forward(tokens, positions, slots, attention, self._tensor(rows), self.kv_cache, on_layer_done)

    def graph_holds(self, chunks: list[PrefillChunk]) -> bool:
        """Whether a prefill graph replays these chunks: prompts from position 0 within its sizes, none
        scoring its prompt (the graphs hold one logits row per prompt)."""
        graphs = self.prefill_graphs
        return (graphs is not None and all(c.start_pos == 0 and not c.scores_prompt for c in chunks)
                and graphs.bucket_for(len(chunks), sum(len(c.token_ids) for c in chunks)) is not None)

    def _prefill_from_graph(self, chunks: list[PrefillChunk]) -> torch.Tensor | None:
        """Prompts a graph holds: their logits (a copy), else None."""
        if not self.graph_holds(chunks):
            return None
        logits = self.prefill_graphs.run([(c.token_ids, c.block_ids) for c in chunks])
        return logits.clone()  # the graph's output is overwritten by the next

    @torch.inference_mode()
    def decode(self, inputs: list[DecodeInput]) -> torch.Tensor:
        """Logits [len(inputs), vocab] of one step for a batch of sequences.

        On CUDA graphs the logits are the graph's static output, overwritten by the next
        decode(): read (sample) them before it, or clone them to keep them.
        """
        top_source = max(i.source for i in inputs)
        if top_source >= 0 and (self._sampled is None or top_source >= len(self._sampled)):
            raise ValueError(f"decode input source row {top_source}: the previous decode_and_sample "
                             f"had {0 if self._sampled is None else len(self._sampled)} rows")
        if self.decode_graphs is not None and (top_source < 0 or self._sampled_fits_graphs()):
            logits = self.decode_graphs.run(*zip(*inputs))  # token ids, positions, block ids, sources
            if logits is not None:
                return logits
        return self.decode_eager(inputs)

    @torch.inference_mode()
    def decode_and_sample(self, inputs: list[DecodeInput], params: list[SamplingParams],
                          histories: list[RowHistory | None] | None = None) -> PendingSample:
        """One decode step and its sampling, queued; the next step's rows may name these rows as sources.

        `histories`: where any row's params adjust the logits, what each such row's sequence is
        (its slot of `token_counts`); None where no row's do."""
        logits = self.decode(inputs)
        adjustments = None if histories is None else penalties(params, histories, self.token_counts)
        pending = sample_async(logits, params, [i.position + 1 for i in inputs], adjustments)
        # Every TP rank feeds the leader's tokens back (a rank's own draw may differ when sampling).
        self.tp.broadcast_(pending.tokens)
        if adjustments is not None:  # the leader's tokens, on every rank: the next step's history
            adjustments.count(pending.tokens)
        self._sampled = pending.tokens
        if self._sampled_fits_graphs():
            self.decode_graphs.sampled[:len(inputs)].copy_(pending.tokens)
        return pending

    def _sampled_fits_graphs(self) -> bool:
        """The last sampled tokens are in the graphs' static buffer too (an eager step may be larger)."""
        graphs = self.decode_graphs
        return graphs is not None and self._sampled is not None and len(self._sampled) <= graphs.max_batch

    @torch.inference_mode()
    def capture_graphs(self, decode: bool = True) -> None:
        """Capture every prefill graph and (unless `decode` is False: a prefill replica) every decode
        graph now, rather than stalling the first step of each size."""
        for graphs in (self.decode_graphs if decode else None, self.prefill_graphs):
            if graphs is not None:
                graphs.capture_all()

    @torch.inference_mode()
    def decode_eager(self, inputs: list[DecodeInput]) -> torch.Tensor:
        """`decode` without graphs: any batch size, every kernel launched from Python."""
        width = max(len(i.block_ids) for i in inputs)
        tables = on_device([list(i.block_ids) + [0] * (width - len(i.block_ids)) for i in inputs],
                           torch.int32, self.device)
        attention = DecodeAttention(
            block_tables=tables,
            context_lens=on_device([i.position + 1 for i in inputs], torch.int32, self.device),
            max_context_len=max(i.position + 1 for i in inputs),
        )
        tokens = self._tensor([i.token_id for i in inputs])
        if any(i.source >= 0 for i in inputs):
            tokens = fed_back_tokens(tokens, self._tensor([i.source for i in inputs]), self._sampled)
        return self.model.forward(
            tokens,
            self._tensor([i.position for i in inputs]),
            self._tensor([self._slot(i.block_ids, i.position) for i in inputs]),
            attention,
            self._tensor(list(range(len(inputs)))),
            self.kv_cache,
        )

    def _slot(self, block_ids: tuple[int, ...], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return on_device(values, torch.long, self.device)


def logit_rows(chunks: list[PrefillChunk]) -> list[range]:
    """Each chunk's rows of `ModelRunner.prefill`'s logits: its every token's if it scores its prompt,
    else its last token's alone (the last of each range)."""
    rows, start = [], 0
    for chunk in chunks:
        count = len(chunk.token_ids) if chunk.scores_prompt else 1
        rows.append(range(start, start + count))
        start += count
    return rows


def leaves_graphs(graph_holds: Callable[[list[PrefillChunk]], bool], chunks: list[PrefillChunk],
                  chunk: PrefillChunk) -> bool:
    """Whether adding `chunk` turns a batch a prefill graph replays into one launched kernel by kernel:
    on a busy host that launch outlasts the GPU's work (and holds the GIL), so the batchers stop there."""
    return bool(chunks) and graph_holds(chunks) and not graph_holds(chunks + [chunk])
