"""Megatron-core's local attention core on ``torch.nn.functional.scaled_dot_product_attention``.

Why: without Transformer Engine, megatron-core's local layer spec computes attention as
``DotProductAttention``: a [b*np, s, s] score tensor (baddbmm), a masked softmax that fills the
mask in place, then a bmm: three passes over an s x s tensor per head and the same again in the
backward. PyTorch's SDPA fuses them (a flash kernel on CPU and on CUDA, with the packed boolean mask
as ``attn_mask``): measured on this project's LAMA-style and RTE jobs (GPT-2-small shape, one process), the
megatron backend was 0.73-0.93x the hf backend's steps/s with the unfused core (1.01-1.13x with this one), the hf backend
already using SDPA (``benchmarks/RESULTS.md``, "The megatron backend at TP=1 against the hf one").

Same contract as ``DotProductAttention.forward``: query [sq, b, np, hn], key/value [sk, b, ng, hn]
(this rank's heads), ``attention_mask`` booleans with True = masked ([b or 1, 1, sq, sk], as
``MegatronBackbone.hidden_at`` builds them; None = causal), returns [sq, b, np * hn]. The cases SDPA
would compute differently fall back to megatron's own forward: attention dropout while training
(megatron draws it from its RNG tracker), query-key layer scaling, a learnable or off-by-one
softmax, sliding windows, fp16 softmax in fp32 (SDPA's fp16 accumulates in fp32 anyway but rounds
its probabilities differently). Numerics: equal within float rounding, not bitwise
(tests/unit/test_megatron_attention.py checks it against ``DotProductAttention`` on masks with
GQA; every megatron test against Hugging Face runs through it).
"""
from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

from ptuning_dist.errors import upstream


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` whose forward is one fused SDPA call where that is exact (module docstring)."""

    def _fused(self, attention_bias, packed_seq_params) -> bool:
        c = self.config
        return (attention_bias is None and packed_seq_params is None
                and not (self.training and self.attention_dropout.p > 0)
                and not c.apply_query_key_layer_scaling
                and getattr(c, "softmax_type", "vanilla") == "vanilla"
                and self.scale_mask_softmax.window_size is None
                and not c.fp16)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._fused(attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, b, np_, hn = query.shape
        q_BNSD, k_BGSD, v_BGSD = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if attention_mask is None:
            out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, is_causal=True,
                                                      scale=self.softmax_scale, enable_gqa=True)
        else:  # True = masked (megatron's convention); SDPA's boolean mask is True = may attend
            out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, attn_mask=~attention_mask,
                                                      scale=self.softmax_scale, enable_gqa=True)
        return out_BNSD.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def use_sdpa(spec) -> None:
    """Swap the local layer spec's attention core for ``SDPAttention`` (in place)."""
    core = spec.submodules.self_attention.submodules
    upstream(core.core_attention is DotProductAttention,  # an upgrade that changed the local spec: say so
             f"megatron-core's local layer spec has core_attention {core.core_attention!r}, not DotProductAttention, "
             "which backbone/megatron_attention.SDPAttention replaces")
    core.core_attention = SDPAttention

