"""The reference splice: values, gradients only to the table, variable prompt counts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ptuning_dist.data.collate import Example, collate
from ptuning_dist.ops.splice import splice_reference
from ptuning_dist.prompt.template import Template


def plan(rows_pos_slots):
    r, p, s = zip(*rows_pos_slots) if rows_pos_slots else ((), (), ())
    return [torch.tensor(x, dtype=torch.long) for x in (r, p, s)]


def test_values_and_variable_counts():
    torch.manual_seed(0)
    V, H, M = 50, 8, 4
    W = torch.randn(V, H)
    table = torch.randn(M, H)
    ids = torch.randint(0, V, (3, 6))
    triplets = [(0, 0, 0), (0, 3, 1), (0, 5, 3), (2, 1, 2)]  # row 0: three, row 1: none, row 2: one
    out = splice_reference(ids, *plan(triplets), W, table)
    ref = F.embedding(ids, W).clone()
    for r, p, s in triplets:
        ref[r, p] = table[s]
    assert torch.equal(out, ref)


def test_gradcheck_float64_and_no_gradient_to_the_vocabulary():
    torch.manual_seed(0)
    W = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    table = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 20, (2, 4))
    p = plan([(0, 1, 0), (0, 2, 2), (1, 0, 1), (1, 3, 2)])
    assert torch.autograd.gradcheck(lambda t: splice_reference(ids, *p, W, t), (table,))
    splice_reference(ids, *p, W, table).sum().backward()
    assert W.grad is None and table.grad is not None
    # slot 2 is used twice: its gradient is the sum of both positions' upstream gradients
    assert torch.equal(table.grad, torch.tensor([[1.0] * 5, [1.0] * 5, [2.0] * 5], dtype=torch.float64))


def test_table_cast_to_backbone_dtype_gradient_stays_fp32():
    W = torch.randn(10, 4).bfloat16()
    table = torch.randn(2, 4, requires_grad=True)
    out = splice_reference(torch.zeros(1, 3, dtype=torch.long), *plan([(0, 2, 1)]), W, table)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert table.grad.dtype == torch.float32


def test_pseudo_tokens_never_index_the_vocabulary(word_piece):
    tok = word_piece
    """Prompt positions carry the pad id from the template, and the plan comes from the loader."""
    t = Template("[P*2] {sub_label} [P] is [MASK]")
    rows = [t.encode({"sub_label": s}, "Paris", tok, 32, "r") for s in ("France", "Germany")]
    u = Template("The capital of {sub_label} [P] [MASK]").encode({"sub_label": "Italy"}, "Rome", tok, 32, "r")
    b = collate([Example(e, 0, "g") for e in rows + [u]], tok.pad_id)
    assert b.prompt_rows_N.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert all(b.ids_BS[r, p] == tok.pad_id for r, p in zip(b.prompt_rows_N, b.prompt_pos_N))
    assert int(b.ids_BS.max()) < tok.vocab_size and int(b.ids_BS.min()) >= 0
    assert b.prompt_slots_N.tolist() == [0, 1, 2, 0, 1, 2, 0]
