"""Hugging Face -> megatron-core state dicts, table by table, sharded for this rank's TP position
and cut to this rank's pipeline stage at load time (megatron-core 0.16 has no importer).

Layout facts the importer encodes:
- HF GPT-2 stores Conv1D weights transposed (in x out): every linear weight is transposed.
- HF's ``c_attn`` output is [q of all heads | k of all heads | v of all heads]; megatron's
  ``linear_qkv`` output is grouped per head (query group): [q_h k_h v_h] for h = 0..heads-1.
  Rows are regrouped per head, so splitting rows into TP chunks gives each rank whole heads.
- Column-parallel weights (qkv, fc1) split their output rows; row-parallel weights (proj, fc2)
  split their input columns and keep the full bias (added once, after the all-reduce).
- LLaMA: q, k, v are separate in HF; megatron's rows go per query group g: [the q heads of g, k_g,
  v_g], so TP chunks hold whole groups. ``linear_fc1`` is [gate; up]: gate and up are split across
  TP separately and each rank stacks its own halves (splitting the fused matrix would hand one rank
  all of gate and the other all of up: a silent wrong answer).
- The word embeddings are vocabulary-parallel (rows split); the vocabulary is padded with zero
  rows to a multiple of TP.
- Pipeline stages (``select_stage``): stage s holds layers [s L/pp, (s+1) L/pp), renumbered from 0;
  the first stage holds the embeddings, the last the final norm and the output layer. A tied head
  at pp > 1 gets its own copy of the REAL word embeddings (megatron would zero it and all-reduce it
  from stage 0 at start-up; loading it here leaves nothing random on the last stage).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ptuning_dist.errors import ConfigError


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


def _qkv_per_head(w: torch.Tensor, heads: int) -> torch.Tensor:
    """[3H, ...] in HF's q|k|v order -> megatron's per-head [q_h k_h v_h] order."""
    three_h = w.shape[0]
    return w.reshape(3, heads, three_h // (3 * heads), *w.shape[1:]).transpose(0, 1).reshape(w.shape)


# (megatron name, HF name, transform(w, heads), TP split dim: 0 = rows, 1 = columns, None = replicated)
GPT2_LAYER = [
    ("input_layernorm.weight", "ln_1.weight", None, None),
    ("input_layernorm.bias", "ln_1.bias", None, None),
    ("self_attention.linear_qkv.weight", "attn.c_attn.weight", lambda w, h: _qkv_per_head(_t(w), h), 0),
    ("self_attention.linear_qkv.bias", "attn.c_attn.bias", _qkv_per_head, 0),
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


LLAMA_LAYER = [
    ("input_layernorm.weight", "input_layernorm.weight", None, None),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", None, 1),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", None, None),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", None, 1),
]
LLAMA_GLOBAL = [("decoder.final_layernorm.weight", "model.norm.weight", None, None)]


def check_layout(model_dir, tp: int, pp: int = 1) -> None:
    """Before any process group: TP must divide the attention heads and key/value groups, PP the
    transformer layers."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    kind = cfg.get("model_type")
    if kind not in ("gpt2", "llama"):
        raise ConfigError(f"model.backend = megatron: no importer for model_type {kind!r} in {path} (gpt2, llama)")
    heads = cfg.get("n_head") or cfg.get("num_attention_heads")
    groups = cfg.get("num_key_value_heads") or heads
    for what, n in (("attention heads", heads), ("key/value groups", groups)):
        if n % tp:
            raise ConfigError(f"parallel.tp = {tp} does not divide the {n} {what} of {path}")
    layers = cfg.get("n_layer") or cfg.get("num_hidden_layers")
    if layers % pp:
        raise ConfigError(f"parallel.pp = {pp} does not divide the {layers} transformer layers of {path}")


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp


def gpt2_to_megatron(hf_state: dict, hf_config, tp: int, rank: int) -> dict:
    """This TP rank's shard of a megatron GPTModel state dict from an HF GPT-2 state dict."""
    heads, layers = hf_config.n_head, hf_config.n_layer
    if heads % tp:
        raise ConfigError(f"parallel.tp = {tp} does not divide the {heads} attention heads")

    def shard(w, dim):  # a copy: a view would keep the whole full-size tensor alive
        return w if dim is None else w.chunk(tp, dim=dim)[rank].clone()

    out = {}
    table = [(m, h, f, d) for m, h, f, d in GPT2_GLOBAL]
    for i in range(layers):
        table += [(f"decoder.layers.{i}.{m}", f"transformer.h.{i}.{h}", f, d) for m, h, f, d in GPT2_LAYER]
    for m_name, h_name, fn, dim in table:
        w = hf_state[h_name]
        out[m_name] = shard(fn(w, heads) if fn else w, dim)
    wte = hf_state["transformer.wte.weight"]
    pad = padded_vocab(wte.shape[0], tp) - wte.shape[0]
    out["embedding.word_embeddings.weight"] = shard(F.pad(wte, (0, 0, 0, pad)), 0)
    return out


def llama_to_megatron(hf_state: dict, hf_config, tp: int, rank: int) -> dict:
    """This TP rank's shard of a megatron GPTModel state dict from an HF LLaMA state dict."""
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % tp or groups % tp:
        raise ConfigError(f"parallel.tp = {tp} must divide the {heads} heads and {groups} key/value groups")
    hn = hf_config.hidden_size // heads

    def shard(w, dim):  # a copy: a view would keep the whole full-size tensor alive
        return w if dim is None else w.chunk(tp, dim=dim)[rank].clone()

    out = {m: shard(hf_state[h], d) for m, h, _, d in LLAMA_GLOBAL}
    for i in range(hf_config.num_hidden_layers):
        pre, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        out.update({pre + m: shard(hf_state[hf + h], d) for m, h, _, d in LLAMA_LAYER})
        q = hf_state[hf + "self_attn.q_proj.weight"].reshape(groups, heads // groups * hn, -1)
        k = hf_state[hf + "self_attn.k_proj.weight"].reshape(groups, hn, -1)
        v = hf_state[hf + "self_attn.v_proj.weight"].reshape(groups, hn, -1)
        qkv = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])  # per group: [q heads, k, v]
        out[pre + "self_attention.linear_qkv.weight"] = shard(qkv, 0)
        gate, up = hf_state[hf + "mlp.gate_proj.weight"], hf_state[hf + "mlp.up_proj.weight"]
        out[pre + "mlp.linear_fc1.weight"] = torch.cat([shard(gate, 0), shard(up, 0)], dim=0)
    vpad = padded_vocab(hf_config.vocab_size, tp) - hf_config.vocab_size
    out["embedding.word_embeddings.weight"] = shard(F.pad(hf_state["model.embed_tokens.weight"], (0, 0, 0, vpad)), 0)
    if not hf_config.tie_word_embeddings:
        out["output_layer.weight"] = shard(F.pad(hf_state["lm_head.weight"], (0, 0, 0, vpad)), 0)
    return out


def megatron_config(hf_config, dtype: torch.dtype, tp: int, pp: int):
    """megatron's TransformerConfig for an HF GPT-2 or LLaMA config. No dropout: the backbone is
    frozen, so train and eval mode compute the same thing (megatron's recompute needs train mode).
    Point-to-point transfers are not batched: batched p2p swapped activations and gradients in
    megatron's interleaved schedule at PP=2 (cpu-facts), and unbatched costs nothing on 1F1B."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    common = dict(hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not torch.cuda.is_available(),
                  params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                  tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, batch_p2p_comm=False)
    if hf_config.model_type == "llama":
        return TransformerConfig(
            num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads, num_query_groups=hf_config.num_key_value_heads,
            ffn_hidden_size=hf_config.intermediate_size, layernorm_epsilon=hf_config.rms_norm_eps,
            add_bias_linear=False, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, **common)
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"GPT-2 activation {hf_config.activation_function!r} has no megatron mapping here")
    return TransformerConfig(
        num_layers=hf_config.n_layer, hidden_size=hf_config.n_embd, num_attention_heads=hf_config.n_head,
        ffn_hidden_size=hf_config.n_inner or 4 * hf_config.n_embd, layernorm_epsilon=hf_config.layer_norm_epsilon,
        add_bias_linear=True, normalization="LayerNorm", activation_func=lambda x: F.gelu(x, approximate="tanh"),
        **common)


def select_stage(shard: dict, num_layers: int, pp: int, stage: int, output_from_embeddings: bool) -> dict:
    """The part of a full-depth state dict that pipeline stage ``stage`` of ``pp`` holds, its
    layers renumbered from 0. ``output_from_embeddings``: a tied head at pp > 1, whose last stage
    holds its own ``output_layer`` loaded with the word embeddings."""
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
        elif last:  # decoder.final_layernorm.*, output_layer.*
            out[name] = w
    if last and output_from_embeddings:
        out["output_layer.weight"] = shard["embedding.word_embeddings.weight"]
    return out
