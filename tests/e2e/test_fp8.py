"""An FP8 checkpoint served 1P1D with `kv_cache.dtype: fp8_e4m3` (real Ray Serve, gloo moving FP8 KV):
the served greedy tokens equal the engine's own on one runner with the same FP8 pool."""
import pytest

from fp8_models import quantize_saved_model
from server import Server
from test_pipeline import run_concurrently
from tiny_models import save_tiny_chat_model

pytestmark = pytest.mark.e2e

PROMPTS = [([(37 * i + 11) % 48000 + 3 for i in range(n)], tokens) for n, tokens in ((4, 10), (29, 12))]


def test_fp8_checkpoint_with_fp8_kv_serves_the_engines_tokens(tmp_path):
    from pdserve.engine.loader import load_model_dir
    from pdserve.engine.offline import OfflineEngine, OfflineSequence

    directory = tmp_path / "model"
    quantize_saved_model(save_tiny_chat_model(directory), directory, "fp8-block")
    (tmp_path / "config.yaml").write_text("kv_cache: {dtype: fp8_e4m3}\n")
    engine = OfflineEngine(load_model_dir(directory), num_blocks=64, block_size=16, kv_cache_dtype="fp8_e4m3")
    expected = []
    for prompt, max_tokens in PROMPTS:
        sequence = OfflineSequence(prompt, max_tokens=max_tokens)
        list(engine.generate([sequence], ignore_eos=True))
        expected.append(sequence.output)
    server = Server("--model", str(directory), "--config", str(tmp_path / "config.yaml"),
                    "--prefill-replicas", "1", "--decode-replicas", "1")
    try:
        for request, tokens in zip(PROMPTS, expected):  # one at a time: the same batches as the engine's
            assert run_concurrently(server, [request]) == [tokens]
        server.wait_all_blocks_free()
    finally:
        server.stop()
