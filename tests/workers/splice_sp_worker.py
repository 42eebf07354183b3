"""Under torchrun with N ranks as one TP group: the fused splice composed for sequence parallelism,
against the unsharded op on the same inputs. Prints SP_OK on success (every rank asserts).

    torchrun --nproc_per_node 2 tests/workers/splice_sp_worker.py

Megatron-core's sequence-parallel layers need Transformer Engine or Apex, so training cannot run
SP on this CPU; this checks the two ways the op serves it, with the real collectives:
- a vocabulary-parallel table: every rank writes the full [s, b, h] partial of its shard (prompt
  rows and positions on rank 0 only), a reduce-scatter along s leaves each rank its chunk;
- a replicated table: each rank writes only its own chunk (``seq_start``/``seq_len``), no
  communication; the table gradient is then partial per rank and is summed over the group.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce, reduce_scatter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ptuning_dist.ops.splice import slot_map, splice  # noqa: E402


def main():
    dist.init_process_group("gloo")
    r, n = dist.get_rank(), dist.get_world_size()
    B, S, V, H, M = 3, 4 * n, 10 * n, 16, 5
    g = torch.Generator().manual_seed(0)  # the same inputs on every rank
    ids = torch.randint(0, V, (B, S), generator=g)
    ids[0, :4] = torch.tensor([0, V - 1, V // n - 1, V // n])  # both ends of the vocabulary and of shard 0
    rows, pos, slots = torch.tensor([0, 1, 1, 2]), torch.tensor([S - 1, 0, S // 2, 1]), torch.tensor([4, 0, 1, 4])
    slot = slot_map(rows, pos, slots, B, S)
    W, P, table, grad_SBH = (torch.randn(V, H, generator=g), torch.randn(S, H, generator=g),
                             torch.randn(M, H, generator=g), torch.randn(S, B, H, generator=g))
    L = S // n
    mine = slice(r * L, (r + 1) * L)

    t = table.clone().requires_grad_(True)
    whole = splice(ids, slot, W, t, seq_first=True, pos_weight_TH=P)
    whole.backward(grad_SBH)
    whole_gt = t.grad

    # vocabulary-parallel table: full partial, then reduce-scatter (backward: all-gather)
    rows_per = V // n
    t = table.clone().requires_grad_(True)
    partial_SBH = splice(ids, slot, W[r * rows_per:(r + 1) * rows_per], t, vocab_start=r * rows_per, vocab_size=V,
                         write_prompt=r == 0, seq_first=True, pos_weight_TH=P if r == 0 else None)
    chunk_LBH = reduce_scatter(torch.empty(L, B, H), list(partial_SBH.chunk(n)))
    assert torch.equal(chunk_LBH, whole[mine]), f"rank {r}: vocabulary-parallel chunk differs"
    chunk_LBH.backward(grad_SBH[mine])
    assert torch.equal(t.grad, whole_gt), f"rank {r}: vocabulary-parallel table gradient differs"

    # replicated table: only this rank's chunk is written; the table gradient summed over the group
    t = table.clone().requires_grad_(True)
    chunk_LBH = splice(ids, slot, W, t, seq_first=True, pos_weight_TH=P, seq_start=r * L, seq_len=L)
    assert chunk_LBH.shape == (L, B, H) and torch.equal(chunk_LBH, whole[mine]), f"rank {r}: chunk differs"
    chunk_LBH.backward(grad_SBH[mine])
    summed = all_reduce(t.grad.clone())
    everyone = [torch.empty_like(summed) for _ in range(n)]
    dist.all_gather(everyone, summed)
    assert all(torch.equal(x, everyone[0]) for x in everyone), f"rank {r}: table gradients differ across ranks"
    torch.testing.assert_close(summed, whole_gt, rtol=1e-6, atol=1e-6)
    dist.barrier()
    dist.destroy_process_group()
    print("SP_OK")


if __name__ == "__main__":
    main()
