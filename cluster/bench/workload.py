"""What `pdserve bench` sends, and when: prompts, output lengths, Poisson arrival times.

Prompts are random token ids (exact prompt and output lengths: the client sends
`ignore_eos`), optionally after a prefix all prompts share, or the first human
turn of a ShareGPT-style JSON file (its text, with the reply's length as
`max_tokens`).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CHARS_PER_TOKEN = 4  # dataset replies are sized in characters / 4 when no tokenizer is given


@dataclass(frozen=True)
class LengthRange:
    """A token count drawn uniformly from [low, high] (low == high: fixed)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> "LengthRange":
        """Accept "128" or "64:256"."""
        low, _, high = text.partition(":")
        bounds = cls(int(low), int(high or low))
        if not 1 <= bounds.low <= bounds.high:
            raise ValueError(f"a length range needs 1 <= low <= high, got {text!r}")
        return bounds

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: a prompt (token ids, or text) and its output budget."""

    prompt: list[int] | str
    max_tokens: int

    @property
    def num_prompt_tokens(self) -> int | None:
        """Exact for token ids; unknown for text until the server answers."""
        return len(self.prompt) if isinstance(self.prompt, list) else None


@dataclass(frozen=True)
class Workload:
    """Where the requests come from: length ranges of random ids, or a dataset file."""

    prompt_tokens: LengthRange = LengthRange(128, 128)
    output_tokens: LengthRange = LengthRange(64, 64)
    dataset: str | None = None
    shared_prefix_tokens: int = 0  # every random prompt starts with the same ids (a system prompt)
    token_id_low: int = 1000  # random ids avoid the low (special) ids of most vocabularies
    token_id_high: int = 20000

    def __post_init__(self) -> None:
        if self.shared_prefix_tokens < 0:
            raise ValueError(f"shared prefix tokens must be >= 0, got {self.shared_prefix_tokens}")

    def requests(self, num: int, seed: int) -> list[RequestSpec]:
        """`num` requests, the same ones for the same seed."""
        rng = random.Random(seed)
        if self.dataset:
            pairs = _dataset_pairs(Path(self.dataset))
            return [RequestSpec(prompt, max_tokens) for prompt, max_tokens in rng.choices(pairs, k=num)]
        prefix = self._random_ids(rng, self.shared_prefix_tokens)
        return [RequestSpec(prefix + self._random_ids(rng, self.prompt_tokens.sample(rng)), self.output_tokens.sample(rng))
                for _ in range(num)]

    def describe(self) -> dict:
        if self.dataset:
            return {"dataset": self.dataset}
        described = {"prompt_tokens": str(self.prompt_tokens), "output_tokens": str(self.output_tokens)}
        if self.shared_prefix_tokens:
            described["shared_prefix_tokens"] = self.shared_prefix_tokens
        return described

    def _random_ids(self, rng: random.Random, num: int) -> list[int]:
        return [rng.randrange(self.token_id_low, self.token_id_high) for _ in range(num)]


def arrival_times(num: int, rate: float | None, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process at `rate` requests/s; None: all at 0."""
    if rate is None:
        return [0.0] * num
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(num):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def _dataset_pairs(path: Path) -> list[tuple[str, int]]:
    """(first human turn, reply length in tokens) of every ShareGPT conversation with a reply."""
    pairs = []
    for item in json.loads(path.read_text()):
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) >= 2 and turns[0].get("value") and turns[1].get("value"):
            pairs.append((turns[0]["value"], max(1, len(turns[1]["value"]) // CHARS_PER_TOKEN)))
    if not pairs:
        raise ValueError(f"{path}: no conversation with a prompt and a reply (ShareGPT format expected)")
    return pairs
