"""Tiny random models of each supported architecture, saved as Hugging Face directories."""
import torch
import transformers

# name -> (config class, model class, config values over tiny_config's defaults)
ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    # head_dim from the config, not hidden / heads
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
    # several experts per token; one dense layer (mlp_only_layers); weights not renormalised
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1],
        norm_topk_prob=False)),
    # a shared expert beside the routed ones, weighed by its sigmoid gate; q/k/v bias
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
        mlp_only_layers=[1])),
    # GLM-4.5: a dense first layer, then MoE with a shared expert and grouped sigmoid routing (the score
    # bias randomised by save_tiny_model); q/k/v bias; rope over half of each head, after q/k norm
    "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM, dict(
        n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, n_shared_experts=1, n_group=4,
        topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True,
        head_dim=16, partial_rotary_factor=0.5)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    # multipliers on the embeddings, the residual branches, the attention scores and the logits
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, dict(
        embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.3, logits_scaling=2.5)),
    # q/k/v and gate/up fused in the checkpoint
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"pad_token_id": 0}),
    # Phi-4-mini's shape: rope over the first 3/4 of each head, tied embeddings
    "phi3_partial_rotary": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        pad_token_id=0, partial_rotary_factor=0.75, tie_word_embeddings=True)),
}
# Sliding-window variants: windows shorter than the test prompts and their outputs.
SLIDING_WINDOW = 8
SLIDING_ARCHITECTURES = {
    "mistral_sliding": (transformers.MistralConfig, transformers.MistralForCausalLM,
                        {"sliding_window": SLIDING_WINDOW}),
    # layers from max_window_layers on slide; the first attends to everything
    "qwen2_sliding": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1)),
    # alternating local and global layers, sandwich norms, soft-capped attention scores and logits (the
    # tiny model's random scores reach the cap of 3: capping shows)
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=3.0, final_logit_softcapping=30.0)),
    # local and global layers with their own rope bases, q/k norm, sandwich norms, soft-capped logits
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        final_logit_softcapping=30.0)),
}
ALL_ARCHITECTURES = {**ARCHITECTURES, **SLIDING_ARCHITECTURES}


def tiny_config(arch: str, **overrides):
    config_cls, _, extra = ALL_ARCHITECTURES[arch]
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
    model = ALL_ARCHITECTURES[arch][1](config).eval()
    if getattr(config, "attn_logit_softcapping", None):
        # transformers 5.17 (the GPU image's) runs Gemma 2 on sdpa, which drops the scores' soft cap
        # without a word; eager applies it (5.24 picks eager for Gemma 2 itself)
        model.config._attn_implementation = "eager"
    with torch.no_grad():  # initialised to zeros: random, so that a routing that ignored them would show
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.uniform_(-0.5, 0.5)
    model.save_pretrained(directory)
    return model


def save_tiny_gemma3_multimodal(directory, seed: int = 0):
    """A tiny random Gemma3ForConditionalGeneration (a one-layer vision tower beside gemma3's text model)."""
    torch.manual_seed(seed)
    text = tiny_config("gemma3").to_dict()
    text.update(vocab_size=300)  # room for the image tokens' ids
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=297, eoi_token_index=298, image_token_index=299)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    return model


def save_tiny_chat_model(directory, seed: int = 0, num_layers: int = 2, max_position_embeddings: int = 1024,
                         arch: str = "llama"):
    """A tiny random model (Llama by default) with the default model's real tokenizer and chat template."""
    import shutil

    from pdserve.engine.loader import default_model_dir

    source = default_model_dir()
    layers = {"num_hidden_layers": num_layers}
    if arch in ("gemma2", "gemma3"):  # one global layer between local ones
        layers = {"num_hidden_layers": 3}
    model = save_tiny_model(arch, directory, seed=seed, vocab_size=49152, **layers,
                            max_position_embeddings=max_position_embeddings, eos_token_id=2, bos_token_id=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    return model


def reference_tokens(model, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy tokens (ignoring end-of-sequence) on the same weights."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
