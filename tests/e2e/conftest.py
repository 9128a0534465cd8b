import pytest

from server import Server


@pytest.fixture(scope="session")
def one_and_two(chat_model):
    """1 prefill + 2 decode replicas, shared by the failure tests and the soak (which run last)."""
    server = Server("--model", str(chat_model[0]), "--prefill-replicas", "1", "--decode-replicas", "2")
    yield server
    server.stop()
