"""GPT-2: learned positions, LayerNorm, GELU (tanh), fused QKV, biases everywhere, tied head.

Hugging Face -> megatron, as ``to_megatron`` maps it:
- HF stores Conv1D weights transposed (in x out): every linear weight is transposed.
- HF's ``c_attn`` output is [q of all heads | k of all heads | v of all heads]; megatron's
  ``linear_qkv`` output is grouped per head: [q_h k_h v_h] for h = 0..heads-1. Rows are regrouped
  per head, so TP chunks of rows hold whole heads.
- Column-parallel weights (qkv, fc1) split their output rows over TP; row-parallel weights (proj,
  fc2) their input columns, keeping the full bias (added once, after the all-reduce).
- The head is always tied to the word embeddings (GPT-2 has no separate one).
"""
from __future__ import annotations

from typing import Mapping

from ptuning_dist.backbone.families.base import Family
from ptuning_dist.errors import ConfigError
from ptuning_dist.planning.shape import LayerStyle, ModelShape


def _t(w):
    return w.t().contiguous()


def qkv_per_head(w, heads: int):
    """[3H, ...] in HF's q|k|v order -> megatron's per-head [q_h k_h v_h] order."""
    three_h = w.shape[0]
    return w.reshape(3, heads, three_h // (3 * heads), *w.shape[1:]).transpose(0, 1).reshape(w.shape)


# (megatron name, HF name, transform(w, heads), TP split dim: 0 = rows, 1 = columns, None = replicated)
LAYER = [
    ("input_layernorm.weight", "ln_1.weight", None, None),
    ("input_layernorm.bias", "ln_1.bias", None, None),
    ("self_attention.linear_qkv.weight", "attn.c_attn.weight", lambda w, h: qkv_per_head(_t(w), h), 0),
    ("self_attention.linear_qkv.bias", "attn.c_attn.bias", qkv_per_head, 0),
    ("self_attention.linear_proj.weight", "attn.c_proj.weight", lambda w, h: _t(w), 1),
    ("self_attention.linear_proj.bias", "attn.c_proj.bias", None, None),
    ("pre_mlp_layernorm.weight", "ln_2.weight", None, None),
    ("pre_mlp_layernorm.bias", "ln_2.bias", None, None),
    ("mlp.linear_fc1.weight", "mlp.c_fc.weight", lambda w, h: _t(w), 0),
    ("mlp.linear_fc1.bias", "mlp.c_fc.bias", None, 0),
    ("mlp.linear_fc2.weight", "mlp.c_proj.weight", lambda w, h: _t(w), 1),
    ("mlp.linear_fc2.bias", "mlp.c_proj.bias", None, None),
]
GLOBAL = [
    ("embedding.position_embeddings.weight", "transformer.wpe.weight", None, None),
    ("decoder.final_layernorm.weight", "transformer.ln_f.weight", None, None),
    ("decoder.final_layernorm.bias", "transformer.ln_f.bias", None, None),
]


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
    def to_megatron(cls, state: dict, cfg, tp: int, rank: int) -> dict:
        from ptuning_dist.backbone.megatron_import import pad_vocab, tp_shard

        heads, out = cfg.n_head, {}
        table = list(GLOBAL) + [(f"decoder.layers.{i}.{m}", f"transformer.h.{i}.{h}", f, d)
                                for i in range(cfg.n_layer) for m, h, f, d in LAYER]
        for m_name, h_name, fn, dim in table:
            w = state[h_name]
            out[m_name] = tp_shard(fn(w, heads) if fn else w, dim, tp, rank)
        out["embedding.word_embeddings.weight"] = tp_shard(pad_vocab(state["transformer.wte.weight"], tp), 0, tp, rank)
        return out
