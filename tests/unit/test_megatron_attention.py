"""backbone/megatron_attention.py: the SDPA attention core against megatron-core's own
DotProductAttention (the oracle) on the masks the megatron backend passes (causal, packed prefix +
own row, padding), with grouped-query attention: the same outputs and input gradients within float
rounding; and the cases it must leave to megatron fall back to it exactly."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def megatron_groups():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ptuning_dist.parallel.launch import free_port, init_model_parallel

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    init_model_parallel(1)
    yield
    ps.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


def cores(**over):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ptuning_dist.backbone.megatron_attention import SDPAttention

    cfg = TransformerConfig(**{**dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                      kv_channels=8, attention_dropout=0.0), **over})
    return [cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
            for cls in (DotProductAttention, SDPAttention)]


def masks(S: int):
    from ptuning_dist.data.packing import packed_attention_mask

    causal = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), diagonal=1)
    # two rows packed after a shared 3-token prefix, then padding (segment 0: prefix, -1: padding)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, -1, -1]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 0, 0]])
    packed = ~packed_attention_mask(pos.expand(2, S), seg.expand(2, S))
    return {"causal": causal, "packed": packed}


@pytest.mark.parametrize("mask", ["causal", "packed"])
def test_sdpa_core_equals_megatrons(megatron_groups, mask):
    torch.manual_seed(0)
    ref, fused = cores()
    S, B = 12, 2
    m = masks(S)[mask]
    q = torch.randn(S, B, 4, 8, requires_grad=True)
    k, v = (torch.randn(S, B, 2, 8, requires_grad=True) for _ in range(2))
    outs, grads = [], []
    for core in (ref, fused):
        out = core(q, k, v, m)
        g = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
        outs.append(out)
        grads.append(g)
    assert outs[0].shape == outs[1].shape == (S, B, 32)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_falls_back_where_sdpa_would_differ(megatron_groups):
    """Query-key layer scaling (and dropout while training): megatron's own forward, bit for bit."""
    torch.manual_seed(0)
    ref, fused = cores(apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True)
    assert not fused._fused(None, None)
    S, B = 12, 2
    q, k, v = torch.randn(S, B, 4, 8), torch.randn(S, B, 2, 8), torch.randn(S, B, 2, 8)
    m = masks(S)["causal"]
    assert torch.equal(fused(q, k, v, m), ref(q, k, v, m))
    _, drop = cores(attention_dropout=0.1)
    assert not drop.train()._fused(None, None) and drop.eval()._fused(None, None)


def test_use_sdpa_swaps_the_local_specs_core_and_refuses_another():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from ptuning_dist.backbone.megatron_attention import SDPAttention, use_sdpa
    from ptuning_dist.errors import UpstreamError

    spec = get_gpt_layer_local_spec()
    use_sdpa(spec)
    assert spec.submodules.self_attention.submodules.core_attention is SDPAttention
    with pytest.raises(UpstreamError, match="not DotProductAttention"):
        use_sdpa(spec)  # already swapped: not the core it was written against
