"""The model's tokenizer, and text that grows token by token.

`IncrementalDetokenizer` turns a stream of token ids into text deltas that never
end in half a UTF-8 character and whose concatenation equals
`tokenizer.decode(all_ids)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

_REPLACEMENT = "\ufffd"


def load_tokenizer(model_dir: str | Path) -> Any:
    """The Hugging Face tokenizer of a model directory, offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def ids_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """`tokenizer.decode` of a list of ids; the Rust tokenizer's own where transformers adds nothing
    to it (a fast tokenizer, no space clean-up): a third of the cost, on every streamed token."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # a transformers without that class: its decode as it is
        TokenizersBackend = None
    plain = (TokenizersBackend is not None and type(tokenizer)._decode is TokenizersBackend._decode
             and not getattr(tokenizer, "clean_up_tokenization_spaces", False))
    if plain:
        backend = tokenizer._tokenizer
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Feed token ids with `add`; each call returns the new, complete text."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._decode = ids_decoder(tokenizer, skip_special_tokens)
        self.token_ids: list[int] = []
        self.text = ""
        # Decoding a window [prefix_offset:] and removing the text of
        # [prefix_offset:read_offset] keeps the spacing a tokenizer gives in context.
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(self.token_ids[self._prefix_offset:])
        if window_text.endswith(_REPLACEMENT) or len(window_text) < len(prefix_text):
            return ""  # an incomplete character: wait for the next token
        delta = window_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: whatever is still held back (a truly invalid byte sequence)."""
        full = self._decode(self.token_ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta
