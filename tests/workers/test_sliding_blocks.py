"""A model whose every layer slides: the decode worker returns blocks behind the window as sequences run,
and its tokens still equal the engine's."""
import pytest

from pdserve.cluster.config import load_config
from pdserve.cluster.settings import decode_settings, prefill_settings
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.loader import load_model_dir
from pdserve.engine.runner import ModelRunner
from pdserve.engine.transfer import make_receiver, make_sender
from pdserve.prefill_worker.worker import PrefillWorker
from handoff_helpers import engine_outputs, run_all_at_once
from tiny_models import SLIDING_WINDOW, save_tiny_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sliding")
    save_tiny_model("mistral_sliding", directory, max_position_embeddings=512)
    return load_model_dir(directory)


@pytest.mark.parametrize("overlap", [False, True], ids=["read-each-step", "one-step-ahead"])
def test_blocks_behind_the_window_return_and_tokens_stay_exact(loaded, overlap):
    decode_runner = ModelRunner(loaded, 96, 4)
    receiver = make_receiver("gloo", decode_runner.kv_cache, peer_id="decode-sliding")
    config = load_config({"decode": {"overlap_steps": overlap}, "transfer": {"timeout_s": 20},
                          "prefill": {"max_batch_tokens": 64}, "kv_cache": {"block_size": 4}})
    decode = DecodeWorker(decode_runner, receiver, decode_settings(config), "decode-sliding")
    prefill_runner = ModelRunner(loaded, 96, 4)
    sender = make_sender("gloo", prefill_runner.kv_cache, sender_id="prefill-sliding")
    prefill = PrefillWorker(prefill_runner, sender, prefill_settings(config), "prefill-sliding")
    try:
        long_prompt = [(7 * i + 3) % 120 + 2 for i in range(37)]  # over four windows
        requests = [(long_prompt, 30), ([5, 9, 11], 24)]
        assert run_all_at_once(prefill, decode, requests) == engine_outputs(loaded, requests)
        # each sequence's last query (at prompt + 28) sees the window before it: the blocks wholly earlier went back
        expected = sum(max(0, (len(prompt) + tokens - 1 - SLIDING_WINDOW) // 4) for prompt, tokens in requests)
        assert decode.num_blocks_returned == expected
        assert decode.pool.num_free == decode.pool.num_blocks
    finally:
        prefill.close()
        decode.close()
