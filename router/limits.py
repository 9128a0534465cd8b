"""What one request may ask for, shared by the HTTP and gRPC front ends.

`RequestLimits` is the `limits` section of the deployment config (None: the
model's context; the defaults live there) plus the model's context length; its checks raise
`InvalidParameter` with the OpenAI-style `param` and `code` of the field at fault.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from pdserve.router.errors import InvalidParameter

MAX_LOGPROBS = 20  # most likely alternatives per token a request may ask for: vLLM's default --max-logprobs


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int  # prompt + completion tokens the model holds
    max_body_bytes: int
    max_prompt_tokens: int | None  # None: the context less one token
    max_tokens: int | None  # None: the context less one token
    max_n: int
    max_stop: int
    request_timeout_s: float

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")

    @property
    def prompt_limit(self) -> int:
        """The most prompt tokens a request may send."""
        return min(self.max_prompt_tokens or self.max_model_len, self.max_model_len - 1)

    @property
    def completion_limit(self) -> int:
        """The most tokens a request may ask to generate."""
        return min(self.max_tokens or self.max_model_len, self.max_model_len - 1)

    def deadline(self) -> float:
        """The `time.time()` after which a request starting now fails."""
        return time.time() + self.request_timeout_s

    def check_prompt_length(self, num_tokens: int, param: str = "prompt") -> None:
        """Refuse a prompt that leaves the model no room to answer."""
        if num_tokens > self.prompt_limit:
            raise InvalidParameter(
                f"This model's maximum context length is {self.max_model_len} tokens and a "
                f"prompt may have at most {self.prompt_limit}; your prompt has {num_tokens} tokens.",
                param, "context_length_exceeded",
            )

    def resolve_max_tokens(self, requested: int | None, prompt_tokens: int, default: int,
                           param: str = "max_tokens") -> int:
        """The completion budget: `requested`, checked, or `default` cut to the context left."""
        room = self.max_model_len - prompt_tokens
        if requested is None:
            return max(1, min(default, room, self.completion_limit))
        if requested < 1:
            raise InvalidParameter(f"`{param}` must be at least 1, got {requested}.", param, "invalid_value")
        if requested > self.completion_limit:
            raise InvalidParameter(
                f"`{param}` is {requested}; this server allows at most {self.completion_limit}.",
                param, "invalid_value",
            )
        if requested > room:
            raise InvalidParameter(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                f"{requested} in the completion). Please reduce the prompt or `{param}`.",
                param, "context_length_exceeded",
            )
        return requested

    def check_n(self, n: int) -> None:
        """Refuse fewer than one choice or more than the limit."""
        if not 1 <= n <= self.max_n:
            raise InvalidParameter(f"`n` must be between 1 and {self.max_n}, got {n}.", "n", "invalid_value")

    def check_stop(self, stop: tuple[str, ...]) -> None:
        """Refuse too many stop strings, or an empty one."""
        if len(stop) > self.max_stop:
            raise InvalidParameter(
                f"At most {self.max_stop} stop strings are allowed, got {len(stop)}.", "stop", "invalid_value"
            )
        if any(s == "" for s in stop):
            raise InvalidParameter("Stop strings must not be empty.", "stop", "invalid_value")


def check_penalties(presence: float, frequency: float, repetition: float, min_tokens: int) -> None:
    """Refuse penalties and min_tokens outside vLLM's ranges."""
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -2.0 <= value <= 2.0:
            raise InvalidParameter(f"`{name}` must be in [-2, 2], got {value}.", name, "invalid_value")
    if not repetition > 0.0:
        raise InvalidParameter(f"`repetition_penalty` must be greater than 0, got {repetition}.",
                               "repetition_penalty", "invalid_value")
    if min_tokens < 0:
        raise InvalidParameter(f"`min_tokens` must be at least 0, got {min_tokens}.", "min_tokens", "invalid_value")


def check_min_tokens(min_tokens: int, max_tokens: int | None, max_param: str = "max_tokens") -> None:
    """Refuse more min_tokens than the max_tokens asked for (when it is asked for)."""
    if max_tokens is not None and min_tokens > max_tokens:
        raise InvalidParameter(f"`min_tokens` ({min_tokens}) must be at most `{max_param}` ({max_tokens}).",
                               "min_tokens", "invalid_value")


def check_logit_bias(bias: dict[int, float]) -> tuple[tuple[int, float], ...]:
    """Refuse biases outside [-100, 100]; the pairs in token order (the token ids are checked by
    `text.check_token_ids`)."""
    for token, value in bias.items():
        if not -100.0 <= value <= 100.0:
            raise InvalidParameter(f"`logit_bias` of token {token} must be in [-100, 100], got {value}.",
                                   "logit_bias", "invalid_value")
    return tuple(sorted(bias.items()))


def check_sampling(temperature: float, top_p: float, top_k: int, min_p: float = 0.0) -> None:
    """Refuse sampling parameters outside their ranges (top_k 0 and -1 both mean off)."""
    if not 0.0 <= min_p <= 1.0:
        raise InvalidParameter(f"`min_p` must be in [0, 1], got {min_p}.", "min_p", "invalid_value")
    if not 0.0 <= temperature <= 2.0:
        raise InvalidParameter(f"`temperature` must be in [0, 2], got {temperature}.", "temperature", "invalid_value")
    if not 0.0 < top_p <= 1.0:
        raise InvalidParameter(f"`top_p` must be in (0, 1], got {top_p}.", "top_p", "invalid_value")
    if top_k < -1:
        raise InvalidParameter(f"`top_k` must be -1, 0 (off) or positive, got {top_k}.", "top_k", "invalid_value")
