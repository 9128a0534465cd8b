"""The model shapes the GPU benchmarks use, and random-weight checkpoints of them.

Scripts run as `python benchmarks/NAME.py`, so they import this as `shapes`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=8192, tie_word_embeddings=False)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=4096)
# Qwen3-8B (dense, q/k norm) and Qwen3-30B-A3B (48 MoE layers of 128 experts, 8 per token; ~61 GB in bf16)
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6,
                max_position_embeddings=40960, tie_word_embeddings=False)
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[], rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
                     tie_word_embeddings=False)
# name -> (transformers config class, model class, shape): what engine_speed.py --shape builds
MODELS = {
    "llama3-8b": ("LlamaConfig", "LlamaForCausalLM", LLAMA3_8B),
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", QWEN3_8B),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", QWEN3_30B_A3B),
}
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=32000)


def save_random_checkpoint(directory: Path, shape: dict, tokenizer_dir: Path) -> Path:
    """A bf16 Llama checkpoint of `shape` with random weights (made on the GPU where there is one), in the
    vocabulary of the tokenizer whose files are copied beside it; reused when `directory` already holds one."""
    if (directory / "config.json").exists():
        return directory
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(**{**shape, "vocab_size": len(tokenizer)}, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory / file.name)
    return directory
