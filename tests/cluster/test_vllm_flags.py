"""`pdserve serve` takes a `vllm serve` command line's model and engine flags, in vLLM's spelling."""
import pytest

from pdserve.cluster.cli import main, make_parser, serve_config
from pdserve.cluster.config import ConfigError


def served(*argv: str):
    return serve_config(make_parser().parse_args(["serve", *argv]))


def test_a_vllm_command_line_sets_the_same_settings():
    config = served("/models/qwen3", "--host", "0.0.0.0", "--port", "8100", "--max-model-len", "2048",
                    "--dtype", "half", "--kv-cache-dtype", "fp8", "--tensor-parallel-size", "2",
                    "--max-num-seqs", "128", "--max-num-batched-tokens", "4096", "--block-size", "32",
                    "--gpu-memory-utilization", "0.9", "--trust-remote-code", "--served-model-name", "qwen")
    assert config.model.path == "/models/qwen3" and config.model.served_model_name == ("qwen",)
    assert (config.router.http_host, config.router.http_port) == ("0.0.0.0", 8100)
    assert (config.model.max_model_len, config.model.dtype, config.kv_cache.dtype) == (2048, "float16", "fp8_e4m3")
    assert (config.prefill.tensor_parallel_size, config.decode.tensor_parallel_size,
            config.colocated.tensor_parallel_size) == (2, 2, 2)
    assert (config.decode.max_running, config.prefill.max_batch_tokens) == (128, 4096)
    assert (config.kv_cache.block_size, config.kv_cache.memory_fraction) == (32, 0.9)


def test_a_pool_s_own_tp_flag_overrides_the_shared_one():
    config = served("--tensor-parallel-size", "2", "--decode-tp", "4")
    assert (config.prefill.tensor_parallel_size, config.decode.tensor_parallel_size) == (2, 4)


def test_the_positional_model_and_model_flag_must_agree():
    assert served("--model", "/m").model.path == served("/m").model.path == "/m"
    with pytest.raises(ConfigError, match="two models named"):
        served("/a", "--model", "/b")


@pytest.mark.parametrize("flag, value", [("--dtype", "int8"), ("--kv-cache-dtype", "fp8_e5m2")])
def test_values_pdserve_cannot_run_are_refused_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit):
        served(flag, value)
    assert "invalid choice" in capsys.readouterr().err


def test_a_chat_template_comes_from_its_file_or_as_text(tmp_path):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    (tmp_path / "chat.jinja").write_text(template)
    assert served("--chat-template", str(tmp_path / "chat.jinja")).model.chat_template == template
    assert served("--chat-template", template).model.chat_template == template
    with pytest.raises(ConfigError, match="model.chat_template: does not compile"):
        served("--chat-template", "{% for m in messages %}")


def test_vllm_s_engine_switches_land_in_the_config():
    config = served("--enforce-eager", "--no-enable-prefix-caching")
    assert config.engine.cuda_graphs is False and config.prefill.prefix_caching is False
    default = served()
    assert default.engine.cuda_graphs is True and default.prefill.prefix_caching is True
    assert served("--enable-prefix-caching").prefill.prefix_caching is True


def test_flags_vllm_users_pass_out_of_habit_are_accepted():
    served("--enable-chunked-prefill", "--disable-log-requests", "--disable-log-stats", "--quantization", "fp8")


def test_quantization_fp8_of_a_bf16_checkpoint_is_refused_before_anything_is_deployed(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    assert main(["serve", str(tmp_path), "--quantization", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "not an FP8 one" in err and "does not quantize weights at load" in err


def test_quantization_fp8_of_the_embedded_model_is_refused(capsys):
    assert main(["serve", "--quantization", "fp8"]) == 2
    assert "not an FP8 one" in capsys.readouterr().err


def test_a_long_vllm_command_line_starts_as_it_is():
    config = served("org/model", "--tokenizer", "org/tokenizer", "--seed", "0", "-pp", "1", "--data-parallel-size",
                    "1", "--swap-space", "16", "--load-format", "safetensors", "--tokenizer-mode", "auto",
                    "--max-seq-len-to-capture", "8192", "--distributed-executor-backend", "ray",
                    "--uvicorn-log-level", "warning", "--max-logprobs", "20", "--disable-frontend-multiprocessing",
                    "--disable-custom-all-reduce", "--generation-config", "vllm", "--revision", "v1")
    assert (config.model.path, config.model.tokenizer, config.model.revision) == ("org/model", "org/tokenizer", "v1")
    assert config == served("org/model", "--tokenizer", "org/tokenizer", "--revision", "v1")  # the rest changes nothing


@pytest.mark.parametrize("flag, names", [("--pipeline-parallel-size", "--tensor-parallel-size"),
                                         ("-dp", "--prefill-replicas")])
def test_parallelism_pdserve_does_not_have_is_refused_naming_its_own(flag, names, capsys):
    assert main(["serve", flag, "2"]) == 2
    assert names in capsys.readouterr().err
