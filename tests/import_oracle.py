"""The whole-model Hugging Face -> megatron import as it was before shard-wise loading (commit
f9988a2): the whole state dict in memory, regrouped with whole matrices, chunked over TP, cut to a
pipeline stage. Kept here as the oracle the shard-wise importer must equal bit for bit."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ptuning_dist.planning.shape import padded_vocab


def tp_shard(w, dim, tp, rank):
    return w if dim is None else w.chunk(tp, dim=dim)[rank].clone()


def pad_vocab(w, tp):
    return F.pad(w, (0, 0, 0, padded_vocab(w.shape[0], tp) - w.shape[0]))


def _t(w):
    return w.t().contiguous()


def qkv_per_head(w, heads):
    return w.reshape(3, heads, w.shape[0] // (3 * heads), *w.shape[1:]).transpose(0, 1).reshape(w.shape)


GPT2_LAYER = [
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
GPT2_GLOBAL = [
    ("embedding.position_embeddings.weight", "transformer.wpe.weight", None, None),
    ("decoder.final_layernorm.weight", "transformer.ln_f.weight", None, None),
    ("decoder.final_layernorm.bias", "transformer.ln_f.bias", None, None),
]


def gpt2(state, cfg, tp, rank):
    out = {}
    table = list(GPT2_GLOBAL) + [(f"decoder.layers.{i}.{m}", f"transformer.h.{i}.{h}", f, d)
                                 for i in range(cfg.n_layer) for m, h, f, d in GPT2_LAYER]
    for m_name, h_name, fn, dim in table:
        w = state[h_name]
        out[m_name] = tp_shard(fn(w, cfg.n_head) if fn else w, dim, tp, rank)
    out["embedding.word_embeddings.weight"] = tp_shard(pad_vocab(state["transformer.wte.weight"], tp), 0, tp, rank)
    return out


LLAMA_LAYER = [
    ("input_layernorm.weight", "input_layernorm.weight", None),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", 1),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", None),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", 1),
]


def llama(state, cfg, tp, rank):
    """LLaMA, Mistral and Qwen2 (q/k/v biases regrouped like the weights)."""
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    hn = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    out = {"decoder.final_layernorm.weight": state["model.norm.weight"]}
    for i in range(cfg.num_hidden_layers):
        pre, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        out.update({pre + m: tp_shard(state[hf + h], d, tp, rank) for m, h, d in LLAMA_LAYER})
        for suffix in ("weight", "bias"):
            if hf + "self_attn.q_proj." + suffix not in state:
                continue
            tail = state[hf + "self_attn.q_proj." + suffix].shape[1:]
            q = state[hf + "self_attn.q_proj." + suffix].reshape(groups, heads // groups * hn, *tail)
            k = state[hf + "self_attn.k_proj." + suffix].reshape(groups, hn, *tail)
            v = state[hf + "self_attn.v_proj." + suffix].reshape(groups, hn, *tail)
            qkv = torch.cat([q, k, v], dim=1).reshape(-1, *tail)
            out[pre + "self_attention.linear_qkv." + suffix] = tp_shard(qkv, 0, tp, rank)
        gate, up = state[hf + "mlp.gate_proj.weight"], state[hf + "mlp.up_proj.weight"]
        out[pre + "mlp.linear_fc1.weight"] = torch.cat([tp_shard(gate, 0, tp, rank), tp_shard(up, 0, tp, rank)])
    out["embedding.word_embeddings.weight"] = tp_shard(pad_vocab(state["model.embed_tokens.weight"], tp), 0, tp, rank)
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = tp_shard(pad_vocab(state["lm_head.weight"], tp), 0, tp, rank)
    return out


def select_stage(shard, num_layers, pp, stage, output_from_embeddings):
    per = num_layers // pp
    first, last = stage == 0, stage == pp - 1
    out = {}
    for name, w in shard.items():
        if name.startswith("decoder.layers."):
            _, _, i, rest = name.split(".", 3)
            if stage * per <= int(i) < (stage + 1) * per:
                out[f"decoder.layers.{int(i) - stage * per}.{rest}"] = w
        elif name.startswith("embedding."):
            if first:
                out[name] = w
        elif last:
            out[name] = w
    if last and output_from_embeddings:
        out["output_layer.weight"] = shard["embedding.word_embeddings.weight"]
    return out


def whole_model_stage(hf_model, dtype, tp, rank, pp, stage):
    """What the old importer loaded on (TP rank, stage): the HF model in fp32, cast, mapped, cut."""
    cfg = hf_model.config
    state = {k: v.float().to(dtype) for k, v in hf_model.state_dict().items()}
    full = (gpt2 if cfg.model_type == "gpt2" else llama)(state, cfg, tp, rank)
    tied = cfg.model_type == "gpt2" or cfg.tie_word_embeddings
    return select_stage(full, cfg.num_hidden_layers, pp, stage, output_from_embeddings=tied and pp > 1)
