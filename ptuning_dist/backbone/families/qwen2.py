"""Qwen2: LLaMA's layout with biases on q, k and v (megatron's ``add_qkv_bias``; the biases are
regrouped per query group like the weights). Sliding-window layers, when the config turns them
on, are checked like Mistral's window."""
from __future__ import annotations

from ptuning_dist.backbone.families.llama import Llama


class Qwen2(Llama):
    model_type = "qwen2"
    qkv_bias = True

    @classmethod
    def tiny_config(cls, **common):
        from transformers import Qwen2Config

        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **common)

    @classmethod
    def attention_window(cls, cfg) -> int | None:
        return getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", False) else None
