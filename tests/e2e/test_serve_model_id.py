"""`pdserve serve ORG/NAME` through a real server: the model read from a Hugging Face cache, offline."""
import httpx
import pytest

from hf_cache import cache_with
from server import Server
from test_pipeline import run_concurrently
from tiny_models import reference_tokens

pytestmark = pytest.mark.e2e
MODEL_ID = "tiny-org/tiny-chat"


def test_a_cached_model_id_is_served_under_its_id(chat_model, tmp_path):
    cache_with(chat_model[0], tmp_path / "hub", MODEL_ID)
    server = Server(MODEL_ID, "--download-dir", str(tmp_path / "hub"), "--colocated", "1",
                    env={"HF_HUB_OFFLINE": "1"})
    try:
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        completion = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": MODEL_ID, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0})
        outputs = run_concurrently(server, [([5, 6, 7, 8], 6)])
    finally:
        server.stop()
    assert [m["id"] for m in models["data"]] == [MODEL_ID]
    assert completion.status_code == 200 and completion.json()["model"] == MODEL_ID, completion.text
    assert outputs == [reference_tokens(chat_model[1], [5, 6, 7, 8], 6)]
