"""`pdserve serve` with tensor-parallel replicas on the CPU (ranks as Ray actors, gloo): transformers' text."""
import httpx
import pytest

from pdserve.engine.tokenizer import load_tokenizer
from e2e.server import Server  # tests/e2e/server.py
from tiny_models import reference_tokens

pytestmark = pytest.mark.e2e

LAYOUTS = {
    "prefill_tp2_decode_tp1": ("--prefill-tp", "2", "--decode-tp", "1"),
    "prefill_tp1_decode_tp2": ("--prefill-tp", "1", "--decode-tp", "2"),
    "colocated_tp2": ("--colocated", "1", "--colocated-tp", "2"),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def tp_server(request, chat_model):
    server = Server("--model", str(chat_model[0]), "--prefill-replicas", "1", "--decode-replicas", "1",
                    *LAYOUTS[request.param])
    yield server
    server.stop()


def test_greedy_text_equals_transformers_and_every_block_is_freed(tp_server, chat_model):
    prompts = [[9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [40, 41, 42]]
    tokenizer = load_tokenizer(chat_model[0])
    for prompt in prompts:
        response = httpx.post(f"{tp_server.url}/v1/completions", timeout=120, json={
            "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == tokenizer.decode(reference_tokens(chat_model[1], prompt, 12))
    pools = tp_server.status()["pools"]
    assert any(r.get("tensor_parallel_size") == 2 for pool in pools.values() for r in pool.values())
    decode = tp_server.wait_all_blocks_free() or pools.get("colocated", {})
    assert all(r["num_blocks_used"] == 0 for r in decode.values())
