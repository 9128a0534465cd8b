"""Choosing the next token of each sequence in a batch.

Rows that ask for penalties, biases or min_tokens have their logits adjusted first
(engine/penalties.py). Then greedy where temperature is 0; otherwise Gumbel-max over
the temperature-scaled, min-p, top-k and top-p filtered logits. Rows that ask for
logprobs get the model's raw log-softmax of the chosen token and of their top-N (one
topk for the batch's rows that ask, copied to the host with the tokens). The Gumbel noise is a hash of (seed, position,
token id), not a generator's state: the same request gives the same tokens on any
replica, in any batch, after any failover — sampling is a function of seed and
position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .copies import on_device, to_host
from .messages import SamplingParams, TopLogprobs  # messages: the router and the workers pass them
from .penalties import Penalties, penalties_from_tokens

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    # The chosen token's log-probability under the model's own logits, before any penalty, bias or
    # temperature (vLLM's default, `raw_logprobs`), when asked.
    logprobs: list[float | None]
    # Each row's `top_logprobs` most likely tokens under the same logits (empty where not asked).
    top_logprobs: list[TopLogprobs]

    def select(self, rows: list[int]) -> SampleResult:
        """The results of these rows only."""
        return SampleResult([self.token_ids[r] for r in rows], [self.logprobs[r] for r in rows],
                            [self.top_logprobs[r] for r in rows])


@dataclass(frozen=True)
class _LogprobRows:
    """The log-probabilities of the rows that ask for them, on the device."""

    rows: list[int]
    chosen: torch.Tensor  # [len(rows)] float32: the chosen token's
    top_values: torch.Tensor | None  # [len(rows), k] float32, descending: the k most likely (None: no row asks)
    top_ids: torch.Tensor | None  # [len(rows), k] int64: their token ids
    num_top: list[int]  # how many of the k each row asked for


class PendingSample:
    """Tokens sampled on the device, on their way to the host.

    The copy to the host is queued behind the sampling kernels; `result()` waits for it
    alone, so the device may already run work queued after it (the next decode step).
    """

    def __init__(self, tokens: torch.Tensor, logprobs: _LogprobRows | None = None):
        self.tokens = tokens  # [B] int64 on the device: what the next step may take as its input
        self._batch, self._logprobs = len(tokens), logprobs
        device_tensors = [tokens]
        if logprobs is not None:
            device_tensors.append(logprobs.chosen)
            if logprobs.top_values is not None:
                device_tensors += [logprobs.top_values, logprobs.top_ids]
        self._host = [to_host(t) for t in device_tensors]
        self._copied = torch.cuda.Event() if tokens.is_cuda else None
        if self._copied is not None:
            self._copied.record()

    def result(self) -> SampleResult:
        if self._copied is not None:
            self._copied.synchronize()
        logprobs: list[float | None] = [None] * self._batch
        tops: list[TopLogprobs] = [()] * self._batch
        asked = self._logprobs
        if asked is not None:
            for row, value in zip(asked.rows, self._host[1].tolist()):
                logprobs[row] = value
            if asked.top_values is not None:
                values, ids = self._host[2].tolist(), self._host[3].tolist()
                for i, (row, k) in enumerate(zip(asked.rows, asked.num_top)):
                    tops[row] = tuple(zip(ids[i][:k], values[i][:k]))
        return SampleResult(self._host[0].tolist(), logprobs, tops)


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
           penalties: Penalties | None = None) -> SampleResult:
    """logits [B, vocab] float32; positions[i]: the index the new token will have in sequence i;
    `penalties`: the adjustments of the rows whose params ask for any (None: no row does)."""
    return sample_async(logits, params, positions, penalties).result()


def sample_async(logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
                 penalties: Penalties | None = None) -> PendingSample:
    """`sample`, queued on the device without waiting for it (no host tensor it builds waits either)."""
    adjusted = logits if penalties is None else penalties.apply(logits)
    chosen = adjusted.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if random_rows:
        rows = on_device(random_rows, torch.long, logits.device)
        picked = _sample_random(adjusted.index_select(0, rows), [params[i] for i in random_rows],
                                [positions[i] for i in random_rows])
        chosen = chosen.index_copy(0, rows, picked)
    return PendingSample(chosen, _logprob_rows(logits, params, chosen))


def _logprob_rows(logits: torch.Tensor, params: list[SamplingParams], chosen: torch.Tensor) -> _LogprobRows | None:
    """The raw log-softmax of the rows that ask: the chosen token's, and one topk for all their top-N."""
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    if not wanted:
        return None
    rows = on_device(wanted, torch.long, logits.device)
    log_probs = torch.log_softmax(logits.index_select(0, rows), dim=-1)
    values = log_probs.gather(1, chosen.index_select(0, rows).unsqueeze(1)).squeeze(1)
    num_top = [params[i].top_logprobs for i in wanted]
    k = min(max(num_top), logits.shape[1])
    top = log_probs.topk(k, dim=-1) if k else None
    return _LogprobRows(wanted, values, top.values if top else None, top.indices if top else None, num_top)


def sample_first(logits: torch.Tensor, params: list[SamplingParams], prompts: list[Sequence[int]],
                 stop_ids: list[frozenset[int]]) -> SampleResult:
    """Each prompt's first token (a prefill's), under the rules of every later one: its history is
    its prompt, and `stop_ids` are held back while `min_tokens` asks for more."""
    adjustments = penalties_from_tokens(params, prompts, [()] * len(prompts), stop_ids, logits.shape[1], logits.device)
    return sample(logits, params, [len(p) for p in prompts], adjustments)


def fed_back_tokens(tokens: torch.Tensor, sources: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """A step's input tokens: row i takes `sampled[sources[i]]` where sources[i] >= 0, else tokens[i].

    This is how a decode step runs before the previous step's tokens reached the host:
    its rows name the previous step's rows, and the tokens move on the device."""
    return torch.where(sources >= 0, sampled.index_select(0, sources.clamp(min=0)), tokens)


def _sample_random(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> torch.Tensor:
    device = logits.device
    temperature = on_device([p.temperature for p in params], torch.float32, device).unsqueeze(1)
    scaled = logits / temperature
    scaled = _min_p(scaled, [p.min_p for p in params])
    scaled = _top_k(scaled, [p.top_k for p in params])
    scaled = _top_p(scaled, [p.top_p for p in params])
    noise = gumbel_noise([p.seed for p in params], positions, logits.shape[1], device)
    return (scaled + noise).argmax(dim=-1)


def _min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Drop the tokens less likely than min_p × the most likely one (vLLM's order: after temperature,
    before top-k and top-p)."""
    if all(p <= 0.0 for p in min_p):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * on_device(min_p, torch.float32, logits.device).unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    if all(k == vocab for k in ks):
        return logits
    k_max = max(ks)
    top = logits.topk(k_max, dim=-1).values  # [B, k_max], descending
    kth = top.gather(1, on_device(ks, torch.long, logits.device).unsqueeze(1) - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in top_p):
        return logits
    p = on_device(top_p, torch.float32, logits.device).unsqueeze(1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p  # keeps the smallest prefix reaching p, at least one token
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def gumbel_noise(seeds: list[int], positions: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, vocab] standard Gumbel noise, a pure function of (seed, position, token id)."""
    keys = on_device([_signed(_mix(_mix(s & _MASK64) ^ p)) for s, p in zip(seeds, positions)], torch.int64, device)
    x = keys.unsqueeze(1) + torch.arange(vocab, device=device, dtype=torch.int64).unsqueeze(0) * _signed(0x9E3779B97F4A7C15)
    x = _mix_tensor(x)
    mantissa = ((x >> 40) & 0xFFFFFF).to(torch.float64)  # 24 uniform bits
    uniform = (mantissa + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(uniform)).to(torch.float32)


def _mix(x: int) -> int:
    """splitmix64's finaliser on Python ints (exact, 64-bit)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def _mix_tensor(x: torch.Tensor) -> torch.Tensor:
    """The same finaliser on int64 tensors; products wrap modulo 2**64 as on the CPU and CUDA."""
    x = x ^ _shift_right(x, 30)
    x = x * _signed(0xBF58476D1CE4E5B9)
    x = x ^ _shift_right(x, 27)
    x = x * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x

