"""The Triton splice on a CUDA device against the pure-torch oracle computed on the CPU (the gpu tier:
skipped, with the reason, where torch sees no CUDA device; ``-m gpu`` selects it)."""
from __future__ import annotations

import pytest
import torch

from ptuning_dist.ops.splice import slot_map, splice, splice_reference


def case(B=4, S=33, V=64, H=40, M=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    rows, pos = torch.tensor([1, 1, 2, 3, 3, 3]), torch.tensor([0, 5, 2, 0, 1, 32])
    slots = torch.randint(0, M, (6,), generator=g)
    return ids, (rows, pos, slots), torch.randn(V, H, generator=g).to(dtype), torch.randn(M, H, generator=g), \
        torch.randn(B, S, H, generator=g).to(dtype)


def table_grad(out, t, grad):
    out.backward(grad)
    return out.detach(), t.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_splice_on_cuda_equals_the_oracle(dtype):
    """fp32: the rows bit-exact; bf16: within one rounding of the fp32 table (the GPU's cast against the
    CPU's round-to-nearest-even). The table gradient against the fp32 sum of the same gradient."""
    ids, plan, W, table, grad = case(dtype=dtype)
    t = table.clone().requires_grad_(True)
    ref_out, _ = table_grad(splice_reference(ids, *plan, W, t), t, grad)
    t = table.clone().requires_grad_(True)
    _, ref_grad = table_grad(splice_reference(ids, *plan, W.float(), t), t, grad.float())
    dev = torch.device("cuda")
    t = table.to(dev).requires_grad_(True)
    out, g = table_grad(splice(ids.to(dev), slot_map(*plan, *ids.shape).to(dev), W.to(dev), t, backend="triton"), t,
                        grad.to(dev))
    assert out.dtype == dtype and g.dtype == torch.float32
    if dtype == torch.float32:
        assert torch.equal(out.cpu(), ref_out)
    else:
        torch.testing.assert_close(out.cpu(), ref_out)  # bf16's own tolerance: one rounding
    torch.testing.assert_close(g.cpu(), ref_grad, rtol=1e-5, atol=1e-5)  # fp32 sums in another order


# ---- the op's other modes on CUDA against its reference backend on the CPU (same arguments): vocabulary
# shards (TP), a sequence chunk (sequence parallelism), a learned position table, the [s, b, h] layout

def on(device, ids, slot, W, table, grad, backend, **kw):
    """The op's output and table gradient (both back on the CPU)."""
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    t = table.to(device).requires_grad_(True)
    out = splice(ids.to(device), slot.to(device), W.to(device), t, backend=backend, **kw)
    out.backward(grad.to(device))
    return out.detach().cpu(), t.grad.cpu()


def against_cpu(dtype, ids, slot, W, table, grad, **kw):
    got = on(torch.device("cuda"), ids, slot, W, table, grad, "triton", **kw)
    ref = on(torch.device("cpu"), ids, slot, W, table, grad, "reference", **kw)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    if dtype == torch.float32:
        assert torch.equal(got[0], ref[0])
    else:  # bf16: within one rounding of the inputs (randn, up to about 4: a bf16 step of 2**-6 there), where
        # a position row is added (in fp32, rounded once) to a row of the opposite sign
        torch.testing.assert_close(got[0], ref[0], rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(got[1], ref[1].float(), rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-4)
    return got


def test_fused_picks_triton_on_cuda():
    from ptuning_dist.ops.splice import _pick

    assert _pick(torch.device("cuda"), "fused") == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_parallel_shards_on_cuda(dtype):
    """Two vocabulary shards: each writes its own ids' rows (zeros elsewhere), one writes the prompt
    rows; their sum is the unsharded splice, and both give the same table gradient, bit for bit."""
    ids, plan, W, table, grad = case(dtype=dtype)
    slot, V = slot_map(*plan, *ids.shape), W.shape[0]
    o0, g0 = against_cpu(dtype, ids, slot, W[: V // 2], table, grad, vocab_start=0, write_prompt=True, vocab_size=V)
    o1, g1 = against_cpu(dtype, ids, slot, W[V // 2:], table, grad, vocab_start=V // 2, write_prompt=False,
                         vocab_size=V)
    full, _ = on(torch.device("cuda"), ids, slot, W, table, grad, "triton")
    assert torch.equal(o0 + o1, full) and torch.equal(g0, g1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_first", [False, True])
def test_sequence_chunk_and_positions_on_cuda(dtype, seq_first):
    """A learned position table over the whole sequence, then over a chunk [8, 24) (positions counted
    from seq_start), in both layouts."""
    ids, plan, W, table, _ = case(dtype=dtype)
    B, S = ids.shape
    H = W.shape[1]
    slot = slot_map(*plan, B, S)
    pos = torch.randn(S + 3, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    for start, length in ((0, S), (8, 16)):
        shape = (length, B, H) if seq_first else (B, length, H)
        grad = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        against_cpu(dtype, ids, slot, W, table, grad, seq_first=seq_first, pos_weight_TH=pos, seq_start=start,
                    seq_len=length)


def test_repeats_bit_for_bit_on_cuda():
    """No atomics: the same inputs give the same output and table gradient, bit for bit."""
    ids, plan, W, table, grad = case(B=8, S=128, V=500, H=300, dtype=torch.bfloat16)
    slot = slot_map(*plan, *ids.shape)
    a = on(torch.device("cuda"), ids, slot, W, table, grad, "triton")
    b = on(torch.device("cuda"), ids, slot, W, table, grad, "triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_realistic_width_on_cuda():
    """A ~1B LLaMA's width (h = 2048, a 32000-word vocabulary) in bf16, 8 rows of 512 tokens with a
    6-token prompt prefix each."""
    g = torch.Generator().manual_seed(3)
    B, S, V, H, Mp = 8, 512, 32000, 2048, 6
    ids = torch.randint(0, V, (B, S), generator=g)
    rows, pos, slots = torch.arange(B).repeat_interleave(Mp), torch.arange(Mp).repeat(B), torch.arange(Mp).repeat(B)
    W, table = torch.randn(V, H, generator=g).to(torch.bfloat16), torch.randn(Mp, H, generator=g)
    grad = torch.randn(B, S, H, generator=g).to(torch.bfloat16)
    against_cpu(torch.bfloat16, ids, slot_map(rows, pos, slots, B, S), W, table, grad)
