"""Tiny random causal LMs of every family ``sparseland.models.arch`` knows, built offline from
transformers configs (float32, eval mode, seconds)."""

from __future__ import annotations

import torch

VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _configs() -> dict:
    import transformers as tf

    window = dict(sliding_window=8)  # shorter than the test prompts: the window mask matters
    return {
        "llama": lambda: tf.LlamaConfig(**_COMMON),
        "mistral": lambda: tf.MistralConfig(**_COMMON, **window),
        "qwen2": lambda: tf.Qwen2Config(**_COMMON),  # q/k/v biases
        "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=16),  # q/k norms
        "gemma2": lambda: tf.Gemma2Config(  # sandwich norms, soft-capping, alternating windows
            **_COMMON, head_dim=16, **window, attn_logit_softcapping=5.0, final_logit_softcapping=3.0
        ),
        "gemma3": lambda: tf.Gemma3TextConfig(**_COMMON, head_dim=16, **window, sliding_window_pattern=2),
        "phi3": lambda: tf.Phi3Config(**_COMMON),  # fused qkv and gate_up
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            **_COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4
        ),
        "mixtral": lambda: tf.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
        "gpt_neox": lambda: tf.GPTNeoXConfig(  # per-head fused qkv, partial rotary, parallel residual, biases
            **{k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}, rotary_pct=0.5
        ),
        "olmo2": lambda: tf.Olmo2Config(**_COMMON),  # post-norm, q/k norms over all heads
    }


FAMILIES = tuple(_configs())
DENSE = tuple(f for f in FAMILIES if f not in ("qwen2_moe", "mixtral"))


def make_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family`` (a key of ``FAMILIES``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _configs()[family]()
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random biases / norm weights, so a layout mistake cannot hide behind zeros or ones
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model
