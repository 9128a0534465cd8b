"""vLLM's adjustments of the logits before sampling, on the device, for the rows that ask for them.

In vLLM's order (its v1 sampler): `logit_bias` is added; EOS and the stop ids go to -inf while
the output has fewer than `min_tokens` tokens; then the repetition penalty (every token of the
prompt or the output: logit / p where the logit is > 0, logit * p otherwise, as transformers'
RepetitionPenaltyLogitsProcessor), the frequency penalty (- p × the token's count in the output)
and the presence penalty (- p once the token is in the output). Temperature, top-k and top-p then
act on the adjusted logits, and a greedy row takes their argmax.

The penalties read each sequence's token history from `TokenCounts`: one row (a slot) per sequence,
on the device, holding its output's token counts and its prompt's tokens. A slot is filled once from
the host's tokens, at the sequence's first sampling there (after a remote or a local prefill, or a
failover's re-prefill of the tokens already sent); from then on each token sampled for it is counted
on the device right after it is sampled (`Penalties.count`), so a decode step queued before the
previous step's tokens reached the host reads them already. Rows that ask for none of this cost
nothing: a batch without them runs no kernel of this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .copies import on_device
from .messages import SamplingParams


@dataclass(frozen=True)
class TokenFill:
    """A slot's first contents: the sequence's tokens as the host has them."""

    prompt: Sequence[int]
    output: Sequence[int]


@dataclass(frozen=True)
class RowHistory:
    """What the adjustments need to know of one row's sequence, besides its params."""

    num_output: int  # output tokens before the one this row samples
    stop_ids: frozenset[int] = frozenset()  # EOS and stop_token_ids: held back while num_output < min_tokens
    slot: int | None = None  # its row of `TokenCounts`, where its params read the history
    fill: TokenFill | None = None  # write the slot from these first (its first sampling)


class TokenCounts:
    """Token histories on the device, a slot each: output counts [slots, vocab] int32 and prompt
    tokens [slots, vocab] bool; allocated at the first fill and grown to the highest slot filled."""

    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.output = torch.zeros(0, vocab, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self._one: torch.Tensor | None = None  # a device 1, what `count` adds (made with the table)

    def fill(self, slots: torch.Tensor, prompt: torch.Tensor, output: torch.Tensor, num_slots: int) -> None:
        """Reset `slots`, then mark `prompt` [2, n] (slot, token) pairs and count `output` [2, m] ones."""
        self._grow(num_slots)
        self.output.index_fill_(0, slots, 0)
        self.prompt.index_fill_(0, slots, False)
        self.prompt.index_put_((prompt[0], prompt[1]), self._one.bool())
        self.count(output[0], output[1])

    def count(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """One more of each token in its slot's output (a slot named twice counts twice)."""
        self.output.index_put_((slots, tokens), self._one, accumulate=True)

    def _grow(self, num_slots: int) -> None:
        rows = len(self.output)
        if num_slots <= rows:
            return
        size = max(num_slots, 2 * rows)
        output = torch.zeros(size, self.vocab, dtype=torch.int32, device=self.device)
        prompt = torch.zeros(size, self.vocab, dtype=torch.bool, device=self.device)
        output[:rows], prompt[:rows] = self.output, self.prompt
        self.output, self.prompt = output, prompt
        self._one = torch.ones((), dtype=torch.int32, device=self.device)


@dataclass(frozen=True)
class Penalties:
    """One sampling call's adjustments, on the device; rows[:num_history] read a token history."""

    rows: torch.Tensor  # [R] int64: the batch's rows that have adjustments
    num_history: int
    slots: torch.Tensor  # [num_history] int64: their slots in `counts`
    scales: torch.Tensor  # [3, num_history] float32: repetition, frequency, presence penalties
    addition_rows: torch.Tensor  # [n] int64: indices into rows ...
    addition_tokens: torch.Tensor  # [n] int64: ... tokens there ...
    added: torch.Tensor  # [n] float32: ... and what is added to their logits (a bias, or -inf below min_tokens)
    counts: TokenCounts
    has_repetition: bool
    has_frequency_or_presence: bool

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [B, vocab] with the adjustments made (a new tensor; `logits` stays the model's)."""
        picked = logits.index_select(0, self.rows)
        if self.added.numel():
            picked.index_put_((self.addition_rows, self.addition_tokens), self.added, accumulate=True)
        if self.num_history:
            self._penalise(picked[:self.num_history])
        return logits.index_copy(0, self.rows, picked)

    def count(self, tokens: torch.Tensor) -> None:
        """Count the tokens sampled [B] in their rows' slots: the next step's history."""
        if self.num_history:
            self.counts.count(self.slots, tokens.index_select(0, self.rows[:self.num_history]))

    def _penalise(self, logits: torch.Tensor) -> None:
        """The penalties on the rows that read a history, in place."""
        output = self.counts.output.index_select(0, self.slots)
        in_output = output > 0
        repetition, frequency, presence = self.scales.unsqueeze(2)  # each [num_history, 1]
        if self.has_repetition:
            seen = self.counts.prompt.index_select(0, self.slots) | in_output
            penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
            logits.copy_(torch.where(seen, penalised, logits))
        if self.has_frequency_or_presence:
            logits.sub_(frequency * output + presence * in_output)


def penalties(params: Sequence[SamplingParams], histories: Sequence[RowHistory | None],
              counts: TokenCounts) -> Penalties | None:
    """The device side of a call's adjustments (filling the slots that start now); None where no row
    has any. `histories[i]` is None exactly where `params[i]` adjusts nothing."""
    with_history = [i for i, h in enumerate(histories) if h is not None and params[i].needs_history]
    rows = with_history + [i for i, h in enumerate(histories) if h is not None and not params[i].needs_history]
    if not rows:
        return None
    additions = [(r, token, value) for r, i in enumerate(rows)
                 for token, value in _additions(params[i], histories[i]) if 0 <= token < counts.vocab]
    fills = [histories[i] for i in with_history if histories[i].fill is not None]
    ints = {
        "rows": rows, "slots": [histories[i].slot for i in with_history],
        "addition_rows": [r for r, _, _ in additions], "addition_tokens": [t for _, t, _ in additions],
        **_fill_columns(fills),
    }
    floats = {"scales": [getattr(params[i], name) for name in _PENALTIES for i in with_history],
              "added": [v for _, _, v in additions]}
    on = _on_device(ints, torch.long, counts.device) | _on_device(floats, torch.float32, counts.device)
    if fills:
        counts.fill(on["fill_slots"], on["prompt"].view(2, -1), on["output"].view(2, -1),
                    max(h.slot for h in fills) + 1)
    return Penalties(
        rows=on["rows"], num_history=len(with_history), slots=on["slots"],
        scales=on["scales"].view(3, len(with_history)), addition_rows=on["addition_rows"],
        addition_tokens=on["addition_tokens"], added=on["added"], counts=counts,
        has_repetition=any(params[i].repetition_penalty != 1.0 for i in with_history),
        has_frequency_or_presence=any(params[i].frequency_penalty or params[i].presence_penalty for i in with_history),
    )


def penalties_from_tokens(params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]],
                          outputs: Sequence[Sequence[int]], stop_ids: Sequence[frozenset[int]], vocab: int,
                          device: torch.device) -> Penalties | None:
    """`penalties` where each row's whole history is at hand (a prompt's first token, offline
    generation): the histories go into a table of their own, for this call only."""
    if not any(p.adjusts_logits for p in params):
        return None
    histories: list[RowHistory | None] = [None] * len(params)
    num_slots = 0
    for i, p in enumerate(params):
        if p.needs_history:
            histories[i] = RowHistory(len(outputs[i]), stop_ids[i], num_slots, TokenFill(prompts[i], outputs[i]))
            num_slots += 1
        elif p.adjusts_logits:
            histories[i] = RowHistory(len(outputs[i]), stop_ids[i])
    return penalties(params, histories, TokenCounts(vocab, device))


_PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")  # the rows of `Penalties.scales`


def _additions(params: SamplingParams, history: RowHistory) -> list[tuple[int, float]]:
    """(token, value) added to a row's logits: its biases, and -inf on the stop ids below min_tokens."""
    held_back = history.stop_ids if history.num_output < params.min_tokens else ()
    return list(params.logit_bias) + [(token, float("-inf")) for token in held_back]


def _fill_columns(fills: list[RowHistory]) -> dict[str, list[int]]:
    """The slots that start now, and their (slot, token) pairs of prompt and output, slots first."""
    prompt = [(h.slot, t) for h in fills for t in h.fill.prompt]
    output = [(h.slot, t) for h in fills for t in h.fill.output]
    return {"fill_slots": [h.slot for h in fills],
            "prompt": [s for s, _ in prompt] + [t for _, t in prompt],
            "output": [s for s, _ in output] + [t for _, t in output]}


def _on_device(columns: dict[str, list], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Several host lists in one copy to the device; a view of it for each, by name."""
    flat = on_device([v for values in columns.values() for v in values], dtype, device)
    views, start = {}, 0
    for name, values in columns.items():
        views[name] = flat[start:start + len(values)]
        start += len(values)
    return views
