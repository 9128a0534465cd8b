"""Prompts in, token strings out: the router's side of the tokenizer.

A prompt arrives as text, token ids, or a list of either (one completion per
entry); `prompt_token_ids` turns it into checked id lists. Detokenizing the
completion is the backend's work; the router only spells single tokens for
logprobs.
"""
from __future__ import annotations

from typing import Any

from pdserve.router.errors import InvalidParameter

_PROMPT_FORMS = "a string, a list of strings, a list of token ids, or a list of token-id lists"


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def vocab_size(tokenizer: Any) -> int:
    """Token ids the tokenizer knows, added tokens included."""
    return len(tokenizer)


def check_token_ids(token_ids: list[int], tokenizer: Any, param: str) -> None:
    """Refuse ids outside the vocabulary."""
    size = vocab_size(tokenizer)
    bad = [t for t in token_ids if not 0 <= t < size]
    if bad:
        raise InvalidParameter(
            f"Token id {bad[0]} in `{param}` is outside the vocabulary (0 to {size - 1}).", param, "invalid_value"
        )


def encode_text(text: str, tokenizer: Any, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
    """A non-empty text's token ids, with the tokenizer's special tokens (BOS) added unless told not to."""
    if not text:
        raise InvalidParameter(f"`{param}` must not be empty.", param, "invalid_value")
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def prompt_token_ids(prompt: Any, tokenizer: Any, add_special_tokens: bool = True) -> list[list[int]]:
    """The token ids of each prompt in `prompt`, in order, each non-empty and in the vocabulary."""
    if isinstance(prompt, str):
        prompts = [encode_text(prompt, tokenizer, add_special_tokens=add_special_tokens)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [encode_text(p, tokenizer, add_special_tokens=add_special_tokens) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        prompts = [list(prompt)]
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in prompt)):
        prompts = [list(p) for p in prompt]
    elif prompt == []:
        raise InvalidParameter("`prompt` must not be empty.", "prompt", "invalid_value")
    else:
        raise InvalidParameter(f"`prompt` must be {_PROMPT_FORMS}.", "prompt", "invalid_type")
    for ids in prompts:
        if not ids:
            raise InvalidParameter("`prompt` must not contain an empty prompt.", "prompt", "invalid_value")
        check_token_ids(ids, tokenizer, "prompt")
    return prompts


def prompt_texts(prompt: Any, prompts: list[list[int]], tokenizer: Any) -> list[str]:
    """Each prompt as text, for `echo`: as sent when it was text, else its token ids decoded."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [tokenizer.decode(ids) for ids in prompts]


def token_text(token_id: int, tokenizer: Any) -> str:
    """How one token reads on its own (for logprobs)."""
    return tokenizer.decode([token_id])
