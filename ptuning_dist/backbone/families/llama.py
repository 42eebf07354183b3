"""LLaMA: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, tied or own head.

Hugging Face -> megatron, as ``to_megatron`` maps it:
- q, k, v are separate in HF; megatron's ``linear_qkv`` rows go per query group g: [the q heads of
  g, k_g, v_g], so TP chunks of rows hold whole groups.
- ``linear_fc1`` is [gate; up]: gate and up are split across TP separately and each rank stacks its
  own halves (splitting the fused matrix would hand one rank all of gate and the other all of up:
  a silent wrong answer).
- o_proj and down_proj are row-parallel (columns split); the head, when untied, is
  vocabulary-parallel like the word embeddings.
"""
from __future__ import annotations

from typing import Mapping

from ptuning_dist.backbone.families.base import Family
from ptuning_dist.planning.shape import LayerStyle, ModelShape

# (megatron name, HF name, TP split dim)
LAYER = [
    ("input_layernorm.weight", "input_layernorm.weight", None),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", 1),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", None),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", 1),
]
GLOBAL = [("decoder.final_layernorm.weight", "model.norm.weight", None)]


class Llama(Family):
    model_type = "llama"
    style = LayerStyle(norm_bias=False, linear_bias=False, gated_mlp=True, learned_positions=False)

    @classmethod
    def shape(cls, cfg: Mapping) -> ModelShape:
        heads = cfg["num_attention_heads"]
        return ModelShape("llama", cfg["num_hidden_layers"], cfg["hidden_size"], heads,
                          cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"], cfg["vocab_size"],
                          cfg["max_position_embeddings"], bool(cfg.get("tie_word_embeddings", False)))

    @classmethod
    def tiny_config(cls, **common):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, **common)

    @classmethod
    def megatron_config(cls, cfg) -> dict:
        import torch.nn.functional as F

        return dict(num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                    num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
                    ffn_hidden_size=cfg.intermediate_size, layernorm_epsilon=cfg.rms_norm_eps,
                    add_bias_linear=False, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu)

    @classmethod
    def gpt_model_kwargs(cls, cfg) -> dict:
        return dict(rotary_base=getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])

    @classmethod
    def to_megatron(cls, state: dict, cfg, tp: int, rank: int) -> dict:
        import torch

        from ptuning_dist.backbone.megatron_import import pad_vocab, tp_shard

        heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
        hn = cfg.hidden_size // heads
        out = {m: tp_shard(state[h], d, tp, rank) for m, h, d in GLOBAL}
        for i in range(cfg.num_hidden_layers):
            pre, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
            out.update({pre + m: tp_shard(state[hf + h], d, tp, rank) for m, h, d in LAYER})
            q = state[hf + "self_attn.q_proj.weight"].reshape(groups, heads // groups * hn, -1)
            k = state[hf + "self_attn.k_proj.weight"].reshape(groups, hn, -1)
            v = state[hf + "self_attn.v_proj.weight"].reshape(groups, hn, -1)
            qkv = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])  # per group: [q heads, k, v]
            out[pre + "self_attention.linear_qkv.weight"] = tp_shard(qkv, 0, tp, rank)
            gate, up = state[hf + "mlp.gate_proj.weight"], state[hf + "mlp.up_proj.weight"]
            out[pre + "mlp.linear_fc1.weight"] = torch.cat([tp_shard(gate, 0, tp, rank), tp_shard(up, 0, tp, rank)])
        words = pad_vocab(state["model.embed_tokens.weight"], tp)
        out["embedding.word_embeddings.weight"] = tp_shard(words, 0, tp, rank)
        if not cfg.tie_word_embeddings:
            out["output_layer.weight"] = tp_shard(pad_vocab(state["lm_head.weight"], tp), 0, tp, rank)
        return out
