"""Tiny random models of each supported architecture, saved as Hugging Face directories."""
import torch
import transformers

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
}


def tiny_config(arch: str, **overrides):
    config_cls, _, extra = ARCHITECTURES[arch]
    values = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=1, bos_token_id=0,
        # A wide init makes the logits peaked, so greedy choices are far from ties.
        initializer_range=0.2,
    )
    values.update(extra)
    values.update(overrides)
    return config_cls(**values)


def save_tiny_model(arch: str, directory, seed: int = 0, **overrides):
    """A random model saved to `directory` in float32; returns the transformers model."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = ARCHITECTURES[arch][1](config).eval()
    model.save_pretrained(directory)
    return model




def save_tiny_chat_model(directory, seed: int = 0, num_layers: int = 2, max_position_embeddings: int = 1024):
    """A tiny random Llama with the default model's real tokenizer and chat template."""
    import shutil

    from pdserve.engine.loader import default_model_dir

    source = default_model_dir()
    model = save_tiny_model("llama", directory, seed=seed, vocab_size=49152, num_hidden_layers=num_layers,
                            max_position_embeddings=max_position_embeddings, eos_token_id=2, bos_token_id=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    return model


def reference_tokens(model, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy tokens (ignoring end-of-sequence) on the same weights."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
