"""Which slice of each weight a tensor-parallel rank holds.

Rank r of a TP group of size N holds:
- q, k, v and gate, up: column-parallel, split on their output rows. q by heads
  (num_heads / N each); k and v by kv heads (num_kv_heads / N each), or, when N
  exceeds num_kv_heads, one kv head replicated over N / num_kv_heads ranks: rank
  r takes kv head r * num_kv_heads // N, the one its query heads attend with.
- o and down: row-parallel, split on their input columns; their outputs are
  partial sums that `TensorParallel.all_reduce` adds up. A bias of theirs is
  added once, by rank 0.
- MoE experts: every rank holds every expert, each cut like the dense MLP on its
  own intermediate dimension (gate and up rows, down columns); the router is
  replicated, so all ranks route alike, and the block's output is a partial sum
  all-reduced as the dense MLP's. Why not whole experts per rank: slicing works
  for any expert count, the ranks' work stays even however the router skews (a
  rank of popular experts would hold every step back), and the MoE kernel and
  the all-reduce are the dense path's. A shared expert is cut as the dense MLP, on
  its own intermediate dimension.
- the vocabulary projection: vocab-parallel when the TP size divides the
  vocabulary (each rank its rows, the logits gathered after it: every rank then
  holds them all, as the sampler wants), replicated otherwise. At 70B it is 2 GB
  of the 35 GB each of two ranks reads per decode step.
- embeddings and norms: replicated.
The KV cache of a rank holds only its kv heads.
"""
from __future__ import annotations

from dataclasses import dataclass

from .model_spec import ModelSpec, UnsupportedModel

# What a weight is, for slicing: which of its axes the TP split cuts.
COLUMN_Q, COLUMN_KV, COLUMN_MLP, COLUMN_EXPERT, COLUMN_VOCAB = "q", "kv", "mlp", "expert", "vocab"  # output rows
COLUMN_SHARED = "shared"
ROW_ATTENTION, ROW_MLP, ROW_EXPERT, ROW_SHARED = "o", "down", "expert_down", "shared_down"  # input columns
REPLICATED = "replicated"


def kv_head_range(num_kv_heads: int, size: int, rank: int) -> range:
    """The kv heads (global numbering) that rank `rank` of `size` holds."""
    if size <= num_kv_heads:
        per_rank = num_kv_heads // size
        return range(rank * per_rank, (rank + 1) * per_rank)
    head = rank * num_kv_heads // size
    return range(head, head + 1)


def check_tp_size(spec: ModelSpec, size: int) -> None:
    """Refuse a TP size the model's head counts or MLP width do not divide."""
    if size < 1:
        raise UnsupportedModel(f"tensor_parallel_size must be >= 1, got {size}")
    problems = []
    if spec.num_heads % size:
        problems.append(f"{spec.num_heads} attention heads")
    if spec.num_kv_heads % size and size % spec.num_kv_heads:
        problems.append(f"{spec.num_kv_heads} kv heads (neither divides the other)")
    if spec.intermediate_size % size:
        problems.append(f"intermediate size {spec.intermediate_size}")
    if spec.moe is not None and spec.moe.intermediate_size % size:
        problems.append(f"expert intermediate size {spec.moe.intermediate_size}")
    if spec.moe is not None and spec.moe.shared_intermediate_size % size:
        problems.append(f"shared expert intermediate size {spec.moe.shared_intermediate_size}")
    if problems:
        raise UnsupportedModel(f"tensor_parallel_size {size} does not split the model's {', '.join(problems)}")


@dataclass(frozen=True)
class ShardLayout:
    """Rank `rank` of `size`: the heads and MLP columns it holds, and how to cut each weight."""

    rank: int
    size: int
    q_heads: range
    kv_heads: range
    mlp_columns: range
    head_dim: int
    expert_columns: range = range(0)  # of each MoE expert's intermediate dimension
    vocab_rows: range | None = None  # of the vocabulary projection; None: replicated
    shared_columns: range = range(0)  # of a shared expert's intermediate dimension

    @classmethod
    def of(cls, spec: ModelSpec, rank: int = 0, size: int = 1) -> ShardLayout:
        check_tp_size(spec, size)
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside a TP group of {size}")
        q = spec.num_heads // size
        mlp = spec.intermediate_size // size
        expert = spec.moe.intermediate_size // size if spec.moe is not None else 0
        vocab = spec.vocab_size // size
        vocab_rows = range(rank * vocab, (rank + 1) * vocab) if size > 1 and spec.vocab_size % size == 0 else None
        shared = spec.moe.shared_intermediate_size // size if spec.moe is not None else 0
        return cls(rank, size, range(rank * q, (rank + 1) * q), kv_head_range(spec.num_kv_heads, size, rank),
                   range(rank * mlp, (rank + 1) * mlp), spec.head_dim, range(rank * expert, (rank + 1) * expert),
                   vocab_rows, range(rank * shared, (rank + 1) * shared))

    @property
    def num_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def is_vocab_parallel(self) -> bool:
        """Each rank computes its share of the logits, gathered after the projection."""
        return self.vocab_rows is not None

    @property
    def holds_row_parallel_bias(self) -> bool:
        """Partial sums are added over the ranks: exactly one adds the bias."""
        return self.rank == 0

    def slices(self, kind: str) -> tuple[slice | None, slice | None]:
        """(rows, columns) of a weight of `kind` that this rank reads; None is the whole axis.

        A 1-d bias takes the rows of its weight."""
        if self.size == 1 or kind == REPLICATED:
            return None, None
        if kind == COLUMN_Q:
            return self._heads(self.q_heads), None
        if kind == COLUMN_KV:
            return self._heads(self.kv_heads), None
        if kind == COLUMN_MLP:
            return _slice(self.mlp_columns), None
        if kind == COLUMN_EXPERT:
            return _slice(self.expert_columns), None
        if kind == COLUMN_VOCAB:
            return (_slice(self.vocab_rows) if self.vocab_rows is not None else None), None
        if kind == ROW_ATTENTION:
            return None, self._heads(self.q_heads)
        if kind == ROW_MLP:
            return None, _slice(self.mlp_columns)
        if kind == ROW_EXPERT:
            return None, _slice(self.expert_columns)
        if kind == COLUMN_SHARED:
            return _slice(self.shared_columns), None
        if kind == ROW_SHARED:
            return None, _slice(self.shared_columns)
        raise ValueError(f"unknown weight kind {kind!r}")

    def _heads(self, heads: range) -> slice:
        return slice(heads.start * self.head_dim, heads.stop * self.head_dim)


def _slice(columns: range) -> slice:
    return slice(columns.start, columns.stop)
