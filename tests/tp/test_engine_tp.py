"""The engine split over two TP ranks (real processes, gloo) gives transformers' greedy tokens."""
import pytest

from pdserve.engine.loader import load_model_dir
from pdserve.engine.model_spec import UnsupportedModel
from rank_bodies import generate_greedy
from ranks import run_ranks
from tiny_models import reference_tokens, save_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
MAX_TOKENS = 12


@pytest.mark.parametrize("arch, kv_heads", [("llama", 2), ("qwen2", 2), ("mistral", 2), ("llama", 1), ("gemma3", 2),
                                           ("phi3_partial_rotary", 2), ("gemma2", 2), ("granite", 2)])
def test_tp2_greedy_tokens_equal_transformers(tmp_path, arch, kv_heads):
    model = save_tiny_model(arch, tmp_path, num_key_value_heads=kv_heads)
    expected = [reference_tokens(model, p, MAX_TOKENS) for p in PROMPTS]
    ranks = run_ranks(generate_greedy, 2, str(tmp_path), PROMPTS, MAX_TOKENS)
    head_dim = 64 // 4
    for result in ranks:
        assert result["outputs"] == expected
        # each rank holds half the query heads and its own kv heads (1 each: split, or replicated)
        assert result["kv_heads"] == 1
        assert result["qkv_rows"] == (2 + 2 * 1) * head_dim
        assert result["lm_head_rows"] == 128 // 2  # vocab-parallel (gemma3: rows of the tied embedding)


@pytest.mark.parametrize("arch, expert_inter", [("qwen3_moe", 48), ("mixtral", 128), ("qwen2_moe", 48),
                                               ("glm4_moe", 48)])
def test_moe_at_tp2_shards_every_expert_and_gives_transformers_greedy_tokens(tmp_path, arch, expert_inter):
    model = save_tiny_model(arch, tmp_path)
    expected = [reference_tokens(model, p, MAX_TOKENS) for p in PROMPTS]
    ranks = run_ranks(generate_greedy, 2, str(tmp_path), PROMPTS, MAX_TOKENS)
    for result in ranks:
        assert result["outputs"] == expected
        assert result["mlp_rows"] == 2 * expert_inter // 2  # gate and up: half of each expert's columns


def test_a_tp_size_the_heads_do_not_allow_is_refused(tmp_path):
    save_tiny_model("llama", tmp_path)  # 4 heads, 2 kv heads
    with pytest.raises(UnsupportedModel, match="tensor_parallel_size 3"):
        load_model_dir(tmp_path, rank=0, tp_size=3)
