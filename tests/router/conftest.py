"""Fixtures of the router's API tests (the fakes live in `router_fakes`)."""
from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from router_fakes import EchoBackend, make_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def backend(tokenizer) -> EchoBackend:
    return EchoBackend(tokenizer)
