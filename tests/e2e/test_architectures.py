"""The newer architectures through `pdserve serve` 1P1D (real Ray Serve, gloo KV transfer):
greedy tokens equal transformers' for prompts longer than Gemma 3's sliding window, through
Qwen3-MoE's experts and through Phi-3's fused, partly rotated projections; a model pdserve cannot
run is refused before anything is deployed. (The other families share these paths: their engine and
TP tests run them against transformers, without a server each.)"""
import gc
import json
import subprocess
import sys

import pytest

from server import Server
from test_pipeline import run_concurrently
from tiny_models import SLIDING_WINDOW, reference_tokens, save_tiny_chat_model, save_tiny_model

pytestmark = pytest.mark.e2e

PROMPTS = [([(31 * i + 7) % 48000 + 3 for i in range(n)], tokens) for n, tokens in ((1, 12), (5, 20), (23, 9), (40, 16))]
assert max(len(p) for p, _ in PROMPTS) > SLIDING_WINDOW


@pytest.fixture(scope="module", params=["gemma3", "qwen3_moe", "phi3_partial_rotary"])
def served(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = save_tiny_chat_model(directory, arch=request.param)
    model.generation_config.eos_token_id = None
    server = Server("--model", str(directory), "--prefill-replicas", "1", "--decode-replicas", "1")
    yield server, model
    server.stop()


def test_greedy_tokens_equal_transformers(served):
    server, model = served
    outputs = run_concurrently(server, PROMPTS)
    for (prompt, max_tokens), output in zip(PROMPTS, outputs):
        assert output == reference_tokens(model, prompt, max_tokens)


def test_serve_refuses_an_unsupported_architecture_up_front(tmp_path):
    save_tiny_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "pdserve.cluster.cli", "serve", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPT2LMHeadModel" in lines[0] and "Qwen3ForCausalLM" in lines[0], done.stderr
    assert "ray" not in done.stdout.lower()  # nothing was started


def test_a_replica_that_cannot_load_its_model_leaves_no_destructor_traceback(tmp_path, monkeypatch):
    from pdserve.cluster.deployments import DecodeDeployment, PrefillDeployment
    from pdserve.engine.model_spec import UnsupportedModel

    save_tiny_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    for deployment in (PrefillDeployment, DecodeDeployment):
        with pytest.raises(UnsupportedModel):
            deployment({"model": {"path": str(tmp_path)}})
        gc.collect()
    assert not unraisable, [u.exc_value for u in unraisable]
