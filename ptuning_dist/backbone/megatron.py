"""A frozen megatron-core GPTModel (local layer spec) behind the same small interface as the HF
backbone, and a table-driven Hugging Face importer that shards for tensor parallelism at load.

Status (issue 4, in progress): GPT-2 style (learned positions, GELU-tanh, LayerNorm, fused QKV)
and LLaMA style (RMSNorm, SwiGLU, RoPE, grouped-query attention) at any TP size on a single
pipeline stage. Not yet: pipeline stages, ZeRO-3 within the DP group, the launcher wiring.

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
  rows to a multiple of TP. The LM head is tied to them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


def check_tp_layout(model_dir, tp: int) -> None:
    """Before any process group: TP must divide the attention heads and key/value groups."""
    import json
    from pathlib import Path

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


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp


def gpt2_to_megatron(hf_state: dict, hf_config, tp: int, rank: int) -> dict:
    """This TP rank's shard of a megatron GPTModel state dict from an HF GPT-2 state dict."""
    heads, layers = hf_config.n_head, hf_config.n_layer
    if heads % tp:
        raise ConfigError(f"parallel.tp = {tp} does not divide the {heads} attention heads")

    def shard(w, dim):
        return w if dim is None else w.chunk(tp, dim=dim)[rank].contiguous()

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

    def shard(w, dim):
        return w if dim is None else w.chunk(tp, dim=dim)[rank].contiguous()

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


def llama_megatron_config(hf_config, dtype=torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads, num_query_groups=hf_config.num_key_value_heads,
        ffn_hidden_size=hf_config.intermediate_size, layernorm_epsilon=hf_config.rms_norm_eps,
        add_bias_linear=False, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tensor_model_parallel_size=_tp_size())


def gpt2_megatron_config(hf_config, dtype=torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"GPT-2 activation {hf_config.activation_function!r} has no megatron mapping here")
    return TransformerConfig(
        num_layers=hf_config.n_layer, hidden_size=hf_config.n_embd, num_attention_heads=hf_config.n_head,
        ffn_hidden_size=hf_config.n_inner or 4 * hf_config.n_embd, layernorm_epsilon=hf_config.layer_norm_epsilon,
        add_bias_linear=True, normalization="LayerNorm", activation_func=lambda x: F.gelu(x, approximate="tanh"),
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tensor_model_parallel_size=_tp_size())


def _tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


def _tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


class MegatronBackbone(nn.Module):
    """Frozen GPTModel (one pipeline stage holding all layers), fed spliced embeddings."""

    def __init__(self, gpt: nn.Module, vocab_size: int):
        super().__init__()
        for p in gpt.parameters():
            p.requires_grad_(False)
        gpt.eval()
        self.gpt = gpt
        self.vocab_size = vocab_size  # the real vocabulary (the shards may be zero-padded)
        self.hidden_size = gpt.config.hidden_size

    @classmethod
    def from_hf(cls, hf_model, dtype=torch.float32) -> "MegatronBackbone":
        """Import a Hugging Face GPT-2 or LLaMA model, sharded for this rank's TP position."""
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from ptuning_dist.parallel import megatron_cpu

        megatron_cpu.enable()
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        cfg = hf_model.config
        state = {k: v.to(dtype) for k, v in hf_model.state_dict().items()}
        if cfg.model_type == "gpt2":
            tcfg, spec = gpt2_megatron_config(cfg, dtype), get_gpt_layer_local_spec()
            kw = dict(max_sequence_length=cfg.n_positions, position_embedding_type="learned_absolute",
                      share_embeddings_and_output_weights=True)
            shard = gpt2_to_megatron(state, cfg, tp, rank)
        elif cfg.model_type == "llama":
            tcfg, spec = llama_megatron_config(cfg, dtype), get_gpt_layer_local_spec(normalization="RMSNorm")
            kw = dict(max_sequence_length=cfg.max_position_embeddings, position_embedding_type="rope",
                      rotary_base=getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"],
                      share_embeddings_and_output_weights=bool(cfg.tie_word_embeddings))
            shard = llama_to_megatron(state, cfg, tp, rank)
        else:
            raise ConfigError(f"no megatron importer for model_type {cfg.model_type!r} (gpt2, llama)")
        gpt = GPTModel(tcfg, spec, vocab_size=padded_vocab(cfg.vocab_size, tp), **kw)
        missing, unexpected = gpt.load_state_dict(shard, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ConfigError(f"HF -> megatron import: missing {missing}, unexpected {unexpected}")
        return cls(gpt, cfg.vocab_size)

    def hidden_at(self, embeds_BSH, attention_mask_BS, target_pos_B) -> torch.Tensor:
        """Word embeddings (+ learned positions, or RoPE inside attention) -> [s, b, h] decoder
        input -> hidden at targets. Right padding lies after every target, so the causal mask
        alone is exact there."""
        B, S, _ = embeds_BSH.shape
        rope = None
        if self.gpt.position_embedding_type == "rope":
            rope = self.gpt.rotary_pos_emb(S)
        else:
            embeds_BSH = embeds_BSH + self.gpt.embedding.position_embeddings.weight[:S].unsqueeze(0)
        decoder_input_SBH = embeds_BSH.transpose(0, 1).contiguous()
        causal = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool, device=embeds_BSH.device), diagonal=1)
        hidden_SBH = self.gpt.decoder(hidden_states=decoder_input_SBH, attention_mask=causal, rotary_pos_emb=rope)
        return hidden_SBH[target_pos_B, torch.arange(B, device=embeds_BSH.device)]

    @property
    def model(self) -> nn.Module:
        """The wrapped GPTModel (what parallel wrappers such as activation checkpointing act on)."""
        return self.gpt

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.embedding.word_embeddings.weight.dtype

    def _vocab_range(self) -> tuple[int, int]:
        rows = self.gpt.embedding.word_embeddings.weight.shape[0]
        start = _tp_rank() * rows
        return start, start + rows

    def embed(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """Full word embeddings on every TP rank: each looks up the ids in its vocabulary shard,
        zeros elsewhere, then a sum over the TP group. The table is frozen, so no gradient path is
        needed through this all-reduce (the prompt rows are inserted after it)."""
        from megatron.core import parallel_state as ps

        weight = self.gpt.embedding.word_embeddings.weight.detach()
        start, end = self._vocab_range()
        local = (ids_BS >= start) & (ids_BS < end)
        embeds_BSH = F.embedding((ids_BS - start).clamp(0, end - start - 1), weight) * local.unsqueeze(-1)
        if ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(embeds_BSH, group=ps.get_tensor_model_parallel_group())
        return embeds_BSH

    def head(self, hidden_BH: torch.Tensor, candidate_ids_K: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32) over the candidates (each TP rank scores those in its shard, then a sum
        whose backward is the identity), or over the whole real vocabulary (gathered shards)."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )
        from torch.distributed.nn.functional import all_gather

        weight = self._head_weight()
        # Each rank's shard gives only part of d(loss)/d(hidden): sum it over TP in the backward
        # (identity forward), as megatron's own vocabulary-parallel output layer does.
        hidden_BH = copy_to_tensor_model_parallel_region(hidden_BH)
        if candidate_ids_K is None:  # B x V: only B rows, so gathering the shards is cheap
            shard_BV = F.linear(hidden_BH, weight)
            if ps.get_tensor_model_parallel_world_size() > 1:
                shard_BV = torch.cat(all_gather(shard_BV, group=ps.get_tensor_model_parallel_group()), dim=-1)
            return shard_BV[:, : self.vocab_size].float()
        start, end = self._vocab_range()
        local = (candidate_ids_K >= start) & (candidate_ids_K < end)
        rows = weight[(candidate_ids_K - start).clamp(0, end - start - 1)] * local.unsqueeze(-1)
        return reduce_from_tensor_model_parallel_region(F.linear(hidden_BH, rows)).float()

    def _head_weight(self) -> torch.Tensor:
        if self.gpt.share_embeddings_and_output_weights:
            return self.gpt.embedding.word_embeddings.weight
        return self.gpt.output_layer.weight

    def head_shard(self, hidden_BH: torch.Tensor) -> torch.Tensor:
        """This TP rank's slice of the vocabulary logits (tied or own vocabulary-parallel table)."""
        return F.linear(hidden_BH, self._head_weight()).float()
