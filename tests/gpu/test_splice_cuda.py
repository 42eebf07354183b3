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
