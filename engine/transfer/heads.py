"""Which kv heads travel on which channel when prefill and decode have different TP sizes.

A replica of TP size N keeps, on each rank, only that rank's kv heads
(engine/sharding.py: split, or replicated when N exceeds the model's kv heads).
Every decode rank needs exactly its own heads; each head comes from one prefill
rank: the lowest-numbered rank holding it (with replicated heads, the others
send nothing). Both ends compute the same plan from their two `KvShard`s, so
only the shards cross the wire (in the hello and the receiver's address).

    prefill TP 2, decode TP 1, 2 heads: rank 0 -> head 0, rank 1 -> head 1
    prefill TP 1, decode TP 2, 2 heads: rank 0 -> head 0 to rank 0, head 1 to rank 1
    prefill TP 4, decode TP 2, 2 heads: ranks 0 and 2 send; 1 and 3 hold copies
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.sharding import kv_head_range


@dataclass(frozen=True)
class KvShard:
    """The kv heads one end's pool holds: TP rank `rank` of `size`, of the model's `num_model_kv_heads`."""

    rank: int
    size: int
    num_model_kv_heads: int

    @classmethod
    def whole(cls, num_kv_heads: int) -> KvShard:
        """A replica of TP 1: every head."""
        return cls(0, 1, num_kv_heads)

    @property
    def heads(self) -> range:
        """The model's kv heads (global numbering) this pool holds, in its order."""
        return kv_head_range(self.num_model_kv_heads, self.size, self.rank)

    def local(self, heads: range) -> slice:
        """Where global `heads` sit on this pool's head axis."""
        if not heads or heads.start < self.heads.start or heads.stop > self.heads.stop:
            raise ValueError(f"heads {heads} are not all in this shard's {self.heads}")
        return slice(heads.start - self.heads.start, heads.stop - self.heads.start)

    def is_source_of(self, head: int) -> bool:
        """This rank is the one of its group that sends `head` (the lowest rank holding it)."""
        holders = [r for r in range(self.size) if head in kv_head_range(self.num_model_kv_heads, self.size, r)]
        return bool(holders) and holders[0] == self.rank


def delivered_heads(sender: KvShard, receiver: KvShard) -> range:
    """The global kv heads `sender` sends to `receiver` (empty: no channel between them)."""
    if sender.num_model_kv_heads != receiver.num_model_kv_heads:
        raise ValueError(f"a model of {sender.num_model_kv_heads} kv heads cannot send to one of "
                         f"{receiver.num_model_kv_heads}")
    both = range(max(sender.heads.start, receiver.heads.start), min(sender.heads.stop, receiver.heads.stop))
    # A sender holding several heads holds each alone; one holding a replicated head sends all or nothing.
    mine = [h for h in both if sender.is_source_of(h)]
    return range(mine[0], mine[-1] + 1) if mine else range(0)
