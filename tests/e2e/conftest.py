import pytest

from server import Server

from tiny_models import save_tiny_chat_model


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """(directory, transformers model): a tiny random Llama with a real tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-chat")
    model = save_tiny_chat_model(directory)
    model.generation_config.eos_token_id = None
    return directory, model


@pytest.fixture(scope="session")
def one_and_two(chat_model):
    """1 prefill + 2 decode replicas, shared by the failure tests and the soak (which run last)."""
    server = Server("--model", str(chat_model[0]), "--prefill-replicas", "1", "--decode-replicas", "2")
    yield server
    server.stop()
