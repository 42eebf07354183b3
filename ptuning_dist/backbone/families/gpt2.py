"""GPT-2: learned positions, LayerNorm, GELU (tanh), fused QKV, biases everywhere, tied head.

Hugging Face -> megatron, as ``megatron_layer`` / ``megatron_globals`` read it, slice by slice:
- HF stores Conv1D weights transposed (in x out): every linear weight is transposed, so a
  column-parallel split (megatron's output rows) reads HF columns and a row-parallel one HF rows.
- HF's ``c_attn`` output is [q of all heads | k of all heads | v of all heads]; megatron's
  ``linear_qkv`` output is grouped per head: [q_h k_h v_h] for h = 0..heads-1. Rows are regrouped
  per head, so TP chunks of rows hold whole heads: a rank reads its heads' three column ranges.
- Column-parallel weights (qkv, fc1) split their output rows over TP; row-parallel weights (proj,
  fc2) their input columns, keeping the full bias (added once, after the all-reduce).
- The head is always tied to the word embeddings (GPT-2 has no separate one).
"""
from __future__ import annotations

from typing import Mapping

from ptuning_dist.backbone.families.base import Family
from ptuning_dist.errors import ConfigError
from ptuning_dist.planning.shape import LayerStyle, ModelShape


def qkv_per_head(w, heads: int):
    """[3H, ...] in HF's q|k|v order -> megatron's per-head [q_h k_h v_h] order."""
    three_h = w.shape[0]
    return w.reshape(3, heads, three_h // (3 * heads), *w.shape[1:]).transpose(0, 1).reshape(w.shape)


class GPT2(Family):
    model_type = "gpt2"
    style = LayerStyle(norm_bias=True, linear_bias=True, gated_mlp=False, learned_positions=True)

    @classmethod
    def shape(cls, cfg: Mapping) -> ModelShape:
        h = cfg["n_embd"]  # the importer always ties GPT-2's head to the word embeddings
        return ModelShape("gpt2", cfg["n_layer"], h, cfg["n_head"], cfg["n_head"], cfg.get("n_inner") or 4 * h,
                          cfg["vocab_size"], cfg["n_positions"], True)

    @classmethod
    def tiny_config(cls, **common):
        from transformers import GPT2Config

        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)

    @classmethod
    def megatron_config(cls, cfg) -> dict:
        import torch.nn.functional as F

        if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"GPT-2 activation {cfg.activation_function!r} has no megatron mapping here")
        return dict(num_layers=cfg.n_layer, hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head,
                    ffn_hidden_size=cfg.n_inner or 4 * cfg.n_embd, layernorm_epsilon=cfg.layer_norm_epsilon,
                    add_bias_linear=True, normalization="LayerNorm",
                    activation_func=lambda x: F.gelu(x, approximate="tanh"))

    @classmethod
    def megatron_layer(cls, read, cfg, tp: int, rank: int, i: int) -> dict:
        import torch

        from ptuning_dist.backbone.megatron_import import lazy, part

        H, heads = cfg.n_embd, cfg.n_head
        F, hn, p = cfg.n_inner or 4 * H, H // heads, f"transformer.h.{i}."
        h0, h1 = part(heads, tp, rank)
        f0, f1 = part(F, tp, rank)
        r0, r1 = part(H, tp, rank)

        def qkv_weight():  # this rank's heads: three column ranges of the (in x 3H) Conv1D weight
            qkv = [read(p + "attn.c_attn.weight", (H, 3 * H), cols=(j * H + h0 * hn, j * H + h1 * hn)).t()
                   for j in range(3)]
            return qkv_per_head(torch.cat(qkv), h1 - h0)

        def qkv_bias():
            return qkv_per_head(torch.cat([read(p + "attn.c_attn.bias", (3 * H,), rows=(j * H + h0 * hn, j * H + h1 * hn))
                                           for j in range(3)]), h1 - h0)

        def t(name, shape, **where):  # Conv1D stores (in x out): megatron's (out x in) is its transpose
            return lambda: read(p + name, shape, **where).t().contiguous()

        return {
            "input_layernorm.weight": lazy(read, p + "ln_1.weight", (H,)),
            "input_layernorm.bias": lazy(read, p + "ln_1.bias", (H,)),
            "self_attention.linear_qkv.weight": qkv_weight,
            "self_attention.linear_qkv.bias": qkv_bias,
            "self_attention.linear_proj.weight": t("attn.c_proj.weight", (H, H), rows=(r0, r1)),
            "self_attention.linear_proj.bias": lazy(read, p + "attn.c_proj.bias", (H,)),
            "pre_mlp_layernorm.weight": lazy(read, p + "ln_2.weight", (H,)),
            "pre_mlp_layernorm.bias": lazy(read, p + "ln_2.bias", (H,)),
            "mlp.linear_fc1.weight": t("mlp.c_fc.weight", (H, F), cols=(f0, f1)),
            "mlp.linear_fc1.bias": lazy(read, p + "mlp.c_fc.bias", (F,), rows=(f0, f1)),
            "mlp.linear_fc2.weight": t("mlp.c_proj.weight", (F, H), rows=(f0, f1)),
            "mlp.linear_fc2.bias": lazy(read, p + "mlp.c_proj.bias", (H,)),
        }

    @classmethod
    def megatron_globals(cls, read, cfg, tp: int, rank: int) -> dict:
        from ptuning_dist.backbone.megatron_import import lazy, vocab_shard

        H = cfg.n_embd
        return {
            "embedding.word_embeddings.weight": lambda: vocab_shard(read, "transformer.wte.weight", cfg.vocab_size, H,
                                                                    tp, rank),
            "embedding.position_embeddings.weight": lazy(read, "transformer.wpe.weight", (cfg.n_positions, H)),
            "decoder.final_layernorm.weight": lazy(read, "transformer.ln_f.weight", (H,)),
            "decoder.final_layernorm.bias": lazy(read, "transformer.ln_f.bias", (H,)),
        }
