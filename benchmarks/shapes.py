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
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=32000)


def save_random_checkpoint(directory: Path, shape: dict, tokenizer_dir: Path) -> Path:
    """A bf16 Llama checkpoint of `shape` with random weights (made on the GPU), in the vocabulary
    of the tokenizer whose files are copied beside it; reused when `directory` already holds one."""
    if (directory / "config.json").exists():
        return directory
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(**{**shape, "vocab_size": len(tokenizer)}, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory / file.name)
    return directory
