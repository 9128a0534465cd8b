"""Suite-wide setup: where there is no GPU, Triton runs interpreted. This must happen
before anything imports triton (the engine does, through its kernels), hence here.
Also the tiny chat model that the server tests share."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import save_tiny_chat_model  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """(directory, transformers model): a tiny random Llama with a real tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-chat")
    model = save_tiny_chat_model(directory)
    model.generation_config.eos_token_id = None
    return directory, model
