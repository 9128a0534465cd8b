"""The messages between the serving parts: what the router, the two workers, and the
cluster's shells and autoscaler hand each other over Ray calls.

    router ──reserve──▶ decode            Reservation (blocks held, where to stream from)
    router ──PrefillRequest──▶ prefill    PrefillResult (the first token, timings)
    router ──StreamStart──▶ decode        (the StreamRequest proto, as data)
    workers ──PrefillLoad / DecodeLoad──▶ routing policies, autoscaler, metrics

Why in the engine: the router may not import the workers, and the workers may not import
each other or the router (DESIGN.md section 2); the engine is the one package below all
of them. Why torch-free: the router never imports torch, so this module (and what it
imports at run time) does not either; `KvDestination` is named for the type checker only.

Loads cross Ray as plain dicts (Ray Serve's routing stats and autoscaling metrics are
dicts): `from_dict` is the one way back, and it fails loudly on a missing field, so a
renamed field cannot silently flatten a ranking into zeros.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

if TYPE_CHECKING:
    from pdserve.engine.transfer.messages import KvDestination

# A sampled token's most likely alternatives: (token id, log-probability), most likely first.
TopLogprobs = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class PromptLogprob:
    """A prompt token's log-probability given the tokens before it (vLLM's prompt_logprobs entry)."""

    token_id: int
    logprob: float
    rank: int  # 1 + the number of tokens more likely than it
    top: TopLogprobs  # the request's prompt_logprobs most likely tokens at this position


@dataclass(frozen=True)
class SamplingParams:
    """How to choose a sequence's next tokens; the penalties and biases are vLLM's (engine/penalties.py)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0
    logprobs: bool = False  # the chosen token's log-probability (the model's raw log-softmax)
    top_logprobs: int = 0  # with logprobs: the this many most likely tokens' too
    min_p: float = 0.0  # sampling drops tokens with probability < min_p × the most likely's (0: off)
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # tokens of the prompt or the output: logit / p where > 0, * p otherwise
    min_tokens: int = 0  # until this many output tokens, the stop ids cannot be sampled
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs and this many alternatives (None: off)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @functools.cached_property  # asked of every row of every step: computed once
    def needs_history(self) -> bool:
        """Whether sampling reads the sequence's tokens so far (a penalty is set)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @functools.cached_property
    def adjusts_logits(self) -> bool:
        """Whether any penalty, bias or min_tokens changes the logits before sampling."""
        return self.needs_history or self.min_tokens > 0 or bool(self.logit_bias)


@dataclass(frozen=True)
class Reservation:
    """Blocks held for one request; the prefill replica fills them, the router streams from `stream_address`."""

    transfer_id: int
    destination: KvDestination | None  # None where the replica prefills itself (colocated)
    stream_address: str  # host:port of this replica's DecodeStream gRPC server
    replica_id: str


@dataclass(frozen=True)
class PrefillRequest:
    """One prompt to prefill into a decode replica's reserved blocks (`destination`)."""

    request_id: str
    prompt: tuple[int, ...]
    sampling: SamplingParams  # for the first token
    destination: KvDestination
    deadline: float  # unix seconds
    stop_ids: frozenset[int] = frozenset()  # EOS and stop_token_ids: held back below `sampling.min_tokens`


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int
    first_logprob: float | None
    first_top_logprobs: TopLogprobs  # empty unless the request asks for top logprobs
    prompt_logprobs: tuple[PromptLogprob, ...]  # the prompt's tokens after its first; empty unless asked
    last_layer_at: float  # time.monotonic() when the prompt's KV was computed (system-wide clock on Linux)
    queue_s: float  # arrival to first chunk computed
    prefill_s: float  # compute time of the batches this prompt was in
    transfer_wait_s: float  # last layer computed to transfer finished (what the handoff adds)
    kv_bytes: int
    replica_id: str


@dataclass(frozen=True)
class StreamStart:
    """What the router sends when it opens a reservation's stream (the StreamRequest proto, as data)."""

    transfer_id: int
    request_id: str
    prompt: tuple[int, ...]
    generated: tuple[int, ...]  # tokens the client already has (prefill's first, or a failed replica's)
    prefill_locally: bool
    max_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]
    deadline: float
    stream_interval: int = 1  # its tokens leave every this many; the first and the last at once


class LoadReportError(KeyError):
    """A replica's load report lacks fields its reader ranks or scales on."""


_Load = TypeVar("_Load")


def _load_from_dict(cls: type[_Load], report: Mapping[str, Any]) -> _Load:
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [name for name in names if name not in report]
    if missing:
        raise LoadReportError(f"{cls.__name__} report lacks {', '.join(missing)} (has {', '.join(sorted(report))})")
    return cls(**{name: report[name] for name in names})


@dataclass(frozen=True)
class PrefillLoad:
    """What a prefill replica reports to routing, metrics and the autoscaler."""

    replica_id: str
    queued_tokens: int  # prompt tokens queued and not yet computed
    queued_requests: int
    tokens_per_s: float  # prefill rate on recent batches
    prefix_hit_rate: float  # share of prompt tokens found in the prefix cache
    prefix_cached_blocks: int
    gpu_idle_share: float  # 1 - device busy / wall over recent batches
    gpu_batch_time_s: float  # mean device time of one recent batch
    batch_period_s: float  # mean wall time between recent batches
    batch_tokens: float  # mean tokens of recent batches
    launch_time_s: float  # mean host time launching a batch (CUDA; near gpu_batch_time_s: launch-bound)

    @classmethod
    def from_dict(cls, report: Mapping[str, Any]) -> PrefillLoad:
        """The load back from its dict (extra entries ignored); LoadReportError if a field is missing."""
        return _load_from_dict(cls, report)


@dataclass(frozen=True)
class DecodeLoad:
    """What a decode replica reports to routing, metrics and the autoscaler."""

    replica_id: str
    num_running: int
    num_context_tokens: int  # KV tokens the running sequences read per step
    num_waiting: int  # reserved or admitted-but-not-running requests
    num_blocks_free: int
    num_blocks_total: int
    step_time_s: float  # mean recent decode step period (wall time, what TPOT sees)
    batch_size: float  # mean recent batch size of those steps
    gpu_step_time_s: float  # mean device time of one of those steps (engine/step_timing.py)
    gpu_idle_share: float  # 1 - device busy / wall over the recent steps
    launch_time_s: float  # mean host time launching a step (CUDA; near gpu_step_time_s: launch-bound)
    max_running: int  # the batch limit this replica runs with
    tokens_per_s: float
    # Its own prefills' prompt tokens per second of their batches (colocated, short prompts, failover; 0: none).
    # Per request, a batch's time would count once for each prompt in it.
    prefill_tokens_per_s: float
    host_s_per_seq: float  # the decode loop's own host time per running sequence per step (not waiting for the GPU)
    arrivals_per_s: float  # reservations per second over the recent window
    prompt_tokens_mean: float  # their mean prompt length
    is_draining: bool
    overlap_steps: bool  # the loop queues step N+1 before reading step N's tokens

    @classmethod
    def from_dict(cls, report: Mapping[str, Any]) -> DecodeLoad:
        """The load back from its dict (extra entries ignored); LoadReportError if a field is missing."""
        return _load_from_dict(cls, report)
