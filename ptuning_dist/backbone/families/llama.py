"""LLaMA: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, tied or own head. Also the
base of the LLaMA-shaped families (Mistral, Qwen2: ``mistral.py``, ``qwen2.py``).

Hugging Face -> megatron, as ``megatron_layer`` / ``megatron_globals`` read it, slice by slice:

- q, k, v are separate in HF; megatron's ``linear_qkv`` rows go per query group g: [the q heads of
  g, k_g, v_g], so TP chunks of rows hold whole groups: a rank reads its groups' rows of q, k, v.
- ``linear_fc1`` is [gate; up]: gate and up are split across TP separately and each rank stacks its
  own rows (splitting the fused matrix would hand one rank all of gate and the other all of up:
  a silent wrong answer).
- o_proj and down_proj are row-parallel (columns split: one read per row, of this rank's columns
  only); the head, when untied, is vocabulary-parallel like the word embeddings.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

from ptuning_dist.backbone.families.base import Family
from ptuning_dist.errors import ConfigError
from ptuning_dist.planning.shape import LayerStyle, ModelShape



class Llama(Family):
    model_type = "llama"
    style = LayerStyle(norm_bias=False, linear_bias=False, gated_mlp=True, learned_positions=False)
    qkv_bias: ClassVar[bool] = False  # Qwen2: q, k and v carry biases (megatron's add_qkv_bias)

    @classmethod
    def shape(cls, cfg: Mapping) -> ModelShape:
        heads = cfg["num_attention_heads"]
        return ModelShape(cls.model_type, cfg["num_hidden_layers"], cfg["hidden_size"], heads,
                          cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"], cfg["vocab_size"],
                          cfg["max_position_embeddings"], bool(cfg.get("tie_word_embeddings", False)),
                          kv_channels=cfg.get("head_dim") or None)

    @classmethod
    def tiny_config(cls, **common):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, **common)

    @staticmethod
    def head_dim(cfg) -> int:
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @classmethod
    def megatron_config(cls, cfg) -> dict:
        import torch.nn.functional as F

        scaling = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ConfigError(f"model_type {cls.model_type}: rope type {scaling.get('rope_type', scaling.get('type'))!r} "
                              "has no megatron mapping here (only the default RoPE)")
        return dict(num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                    num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
                    kv_channels=cls.head_dim(cfg), ffn_hidden_size=cfg.intermediate_size,
                    layernorm_epsilon=cfg.rms_norm_eps, add_bias_linear=False, add_qkv_bias=cls.qkv_bias,
                    normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu)

    @classmethod
    def gpt_model_kwargs(cls, cfg) -> dict:
        return dict(rotary_base=getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])

    @classmethod
    def megatron_layer(cls, read, cfg, tp: int, rank: int, i: int) -> dict:
        import torch

        from ptuning_dist.backbone.megatron_import import lazy, part

        H, heads, groups, I = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
        hd, p = cls.head_dim(cfg), f"model.layers.{i}."
        per_group = heads // groups
        g0, g1 = part(groups, tp, rank)  # this rank's query groups
        i0, i1 = part(I, tp, rank)
        a0, a1 = part(heads * hd, tp, rank)

        def qkv(suffix, shape_tail):  # per group g: [the q heads of g, k_g, v_g]
            q = read(p + "self_attn.q_proj" + suffix, (heads * hd, *shape_tail),
                     rows=(g0 * per_group * hd, g1 * per_group * hd))
            k = read(p + "self_attn.k_proj" + suffix, (groups * hd, *shape_tail), rows=(g0 * hd, g1 * hd))
            v = read(p + "self_attn.v_proj" + suffix, (groups * hd, *shape_tail), rows=(g0 * hd, g1 * hd))
            n = g1 - g0
            return torch.cat([q.reshape(n, per_group * hd, *shape_tail), k.reshape(n, hd, *shape_tail),
                              v.reshape(n, hd, *shape_tail)], dim=1).reshape(-1, *shape_tail)

        def fc1():  # [gate; up], each split over TP on its own (see the module docstring)
            return torch.cat([read(p + "mlp.gate_proj.weight", (I, H), rows=(i0, i1)),
                              read(p + "mlp.up_proj.weight", (I, H), rows=(i0, i1))])

        out = {
            "input_layernorm.weight": lazy(read, p + "input_layernorm.weight", (H,)),
            "self_attention.linear_qkv.weight": lambda: qkv(".weight", (H,)),
            "self_attention.linear_proj.weight": lazy(read, p + "self_attn.o_proj.weight", (H, heads * hd),
                                                      cols=(a0, a1)),
            "pre_mlp_layernorm.weight": lazy(read, p + "post_attention_layernorm.weight", (H,)),
            "mlp.linear_fc1.weight": fc1,
            "mlp.linear_fc2.weight": lazy(read, p + "mlp.down_proj.weight", (H, I), cols=(i0, i1)),
        }
        if cls.qkv_bias:
            out["self_attention.linear_qkv.bias"] = lambda: qkv(".bias", ())
        return out

    @classmethod
    def megatron_globals(cls, read, cfg, tp: int, rank: int) -> dict:
        from ptuning_dist.backbone.megatron_import import lazy, vocab_shard

        H, V = cfg.hidden_size, cfg.vocab_size
        out = {"embedding.word_embeddings.weight": lambda: vocab_shard(read, "model.embed_tokens.weight", V, H, tp, rank),
               "decoder.final_layernorm.weight": lazy(read, "model.norm.weight", (H,))}
        if not cfg.tie_word_embeddings:
            out["output_layer.weight"] = lambda: vocab_shard(read, "lm_head.weight", V, H, tp, rank)
        return out
