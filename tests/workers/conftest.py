"""The workers' tests share a tiny model and a gloo-connected prefill + decode pair (`workers`)."""
import pytest

from pdserve.cluster.config import load_config
from pdserve.cluster.settings import decode_settings, prefill_settings
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.loader import load_model_dir
from pdserve.engine.runner import ModelRunner
from pdserve.engine.transfer import make_receiver, make_sender
from pdserve.prefill_worker.worker import PrefillWorker
from tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    """(transformers model, its directory): the oracle of the model `loaded` serves."""
    directory = tmp_path_factory.mktemp("workers")
    return save_tiny_model("llama", directory, max_position_embeddings=512), directory


@pytest.fixture(scope="module")
def loaded(model_and_dir):
    return load_model_dir(model_and_dir[1])


@pytest.fixture(params=[False, True], ids=["read-each-step", "one-step-ahead"])
def workers(loaded, request):
    """The decode loop both ways: reading each step's tokens before the next (the CPU's default)
    and queueing step N+1 before reading step N (the GPU's)."""
    decode_runner = ModelRunner(loaded, 256, 4)
    receiver = make_receiver("gloo", decode_runner.kv_cache, peer_id="decode-test")
    config = load_config({"decode": {"overlap_steps": request.param}, "transfer": {"timeout_s": 20},
                          "prefill": {"max_batch_tokens": 32}, "kv_cache": {"block_size": 4}})
    decode = DecodeWorker(decode_runner, receiver, decode_settings(config), "decode-test")
    prefill_runner = ModelRunner(loaded, 128, 4)
    sender = make_sender("gloo", prefill_runner.kv_cache, sender_id="prefill-test")
    prefill = PrefillWorker(prefill_runner, sender, prefill_settings(config), "prefill-test")
    yield prefill, decode
    prefill.close()
    decode.close()
