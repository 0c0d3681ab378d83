"""Tiny random-initialised models of every family xbit has an adapter for, built offline from each family's real
config class, with the family's quirks kept (scaled embeddings, soft-capping, sliding windows, tied and untied
heads, q/k norms, fused projections, experts, a vision tower)."""

import torch

from tests.tiny import WORDS

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _config(family: str):
    import transformers as T

    if family == "llama":  # SmolLM2: tied embeddings
        return T.LlamaConfig(**SMALL, tie_word_embeddings=True)
    if family == "qwen2":  # q/k/v biases, untied head
        return T.Qwen2Config(**SMALL, tie_word_embeddings=False)
    if family == "qwen3":  # q/k norms, explicit head_dim
        return T.Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=False)
    if family == "mistral":  # sliding window
        return T.MistralConfig(**SMALL, sliding_window=8, tie_word_embeddings=False)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return T.Phi3Config(**SMALL, tie_word_embeddings=False)
    if family == "gemma2":  # scaled embedding, attention and final logit soft-capping, alternating sliding window
        return T.Gemma2Config(**SMALL, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0)
    if family == "gemma3":  # scaled embedding, sliding and global layers with their own rotary tables
        return T.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=8, layer_types=["sliding_attention",
                                                                                       "full_attention"])
    if family == "gemma3-multimodal":  # the language model inside Gemma3ForConditionalGeneration
        text = dict(SMALL, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=8)
        return T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=127,
                              boi_token_id=125, eoi_token_id=126)
    if family == "mixtral":  # 4 experts, 2 per token, untied head
        return T.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    raise KeyError(family)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "gemma3-multimodal", "mixtral")


def family_model(family: str, seed: int = 0):
    """A float model of the family with sharper weights than the 0.02-std init, so that next-token
    distributions are far from uniform and a wrong scale or norm shows in the KL."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "vision" not in name:
                p.normal_(0, 0.3 if "lm_head" in name else 0.12 if "embed" in name else 0.05)
    return model


def calibration_texts(n_texts: int = 12, words: int = 400, seed: int = 0) -> list[str]:
    """Word sequences over the tiny tokenizer's vocabulary (every token known to it)."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=g).tolist())
            for _ in range(n_texts)]
