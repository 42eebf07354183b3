"""GPT-NeoX (Pythia): the hf backend only (no megatron importer, no memory model); its own head."""
from __future__ import annotations

from ptuning_dist.backbone.families.base import Family


class GPTNeoX(Family):
    model_type = "gpt_neox"

    @classmethod
    def tiny_config(cls, **common):
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=512, tie_word_embeddings=False, **common)
