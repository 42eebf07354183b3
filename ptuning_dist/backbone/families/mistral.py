"""Mistral: LLaMA's layout (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases) plus a
sliding attention window. The megatron import is LLaMA's; the window is checked where it could
bind: a sequence longer than it would need banded attention, which the local layer spec lacks."""
from __future__ import annotations

from ptuning_dist.backbone.families.llama import Llama


class Mistral(Llama):
    model_type = "mistral"

    @classmethod
    def tiny_config(cls, **common):
        from transformers import MistralConfig

        return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, sliding_window=256, **common)

    @classmethod
    def attention_window(cls, cfg) -> int | None:
        return getattr(cfg, "sliding_window", None)
