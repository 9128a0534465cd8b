import pytest

from e2e.server import Server
from tiny_models import save_tiny_chat_model


@pytest.fixture(scope="session")
def one_and_one(tmp_path_factory):
    """A real `pdserve serve`, 1 prefill + 1 decode replica, of a tiny random Llama with a real tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-chat-bench")
    save_tiny_chat_model(directory)
    server = Server("--model", str(directory), "--prefill-replicas", "1", "--decode-replicas", "1")
    yield server
    server.stop()
