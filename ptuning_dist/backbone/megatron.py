"""A frozen megatron-core GPTModel (local layer spec) behind the same small interface as the HF
backbone, and a table-driven Hugging Face importer that shards for tensor parallelism at load.

Status (issue 4, in progress): GPT-2 style models (learned positions, GELU-tanh, LayerNorm, fused
QKV) at any TP size on a single pipeline stage. Not yet: LLaMA style (RMSNorm, SwiGLU, RoPE, GQA),
pipeline stages, ZeRO-3 within the DP group, and the launcher wiring.

Layout facts the importer encodes:
- HF GPT-2 stores Conv1D weights transposed (in x out): every linear weight is transposed.
- HF's ``c_attn`` output is [q of all heads | k of all heads | v of all heads]; megatron's
  ``linear_qkv`` output is grouped per head (query group): [q_h k_h v_h] for h = 0..heads-1.
  Rows are regrouped per head, so splitting rows into TP chunks gives each rank whole heads.
- Column-parallel weights (qkv, fc1) split their output rows; row-parallel weights (proj, fc2)
  split their input columns and keep the full bias (added once, after the all-reduce).
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
    def from_hf_gpt2(cls, hf_model, dtype=torch.float32) -> "MegatronBackbone":
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from ptuning_dist.parallel import megatron_cpu

        megatron_cpu.enable()
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        cfg = hf_model.config
        gpt = GPTModel(gpt2_megatron_config(cfg, dtype), get_gpt_layer_local_spec(),
                       vocab_size=padded_vocab(cfg.vocab_size, tp), max_sequence_length=cfg.n_positions,
                       position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True)
        state = gpt2_to_megatron({k: v.to(dtype) for k, v in hf_model.state_dict().items()}, cfg, tp, rank)
        missing, unexpected = gpt.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ConfigError(f"HF -> megatron import: missing {missing}, unexpected {unexpected}")
        return cls(gpt, cfg.vocab_size)

    def hidden_at(self, embeds_BSH, attention_mask_BS, target_pos_B) -> torch.Tensor:
        """Word embeddings + learned positions -> [s, b, h] decoder input -> hidden at targets.
        Right padding lies after every target, so the causal mask alone is exact there."""
        B, S, _ = embeds_BSH.shape
        pos_SH = self.gpt.embedding.position_embeddings.weight[:S]
        decoder_input_SBH = (embeds_BSH + pos_SH.unsqueeze(0)).transpose(0, 1).contiguous()
        causal = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool, device=embeds_BSH.device), diagonal=1)
        hidden_SBH = self.gpt.decoder(hidden_states=decoder_input_SBH, attention_mask=causal)
        return hidden_SBH[target_pos_B, torch.arange(B, device=embeds_BSH.device)]

    def head_shard(self, hidden_BH: torch.Tensor) -> torch.Tensor:
        """This TP rank's slice of the vocabulary logits (the tied, vocabulary-parallel table)."""
        return F.linear(hidden_BH, self.gpt.embedding.word_embeddings.weight).float()
