"""The Triton backend of ``ptuning::splice`` (``ops/splice.py``): CUDA, or CPU tensors under
``TRITON_INTERPRET=1`` (set before triton is imported). Imported only when a Triton splice runs.

Forward: one program per (position, column block) writes the position's row from the vocabulary
shard, the prompt table (cast to the weight's dtype) or zeros, plus the learned position in fp32
rounded once. Backward: one program per (slot, column block) scans the slot map in position order
and sums only its slot's gradient rows: a fixed tile order and reduction tree, no atomics, so the
bits repeat run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _splice_fwd_kernel(ids_ptr, slot_ptr, w_ptr, tab_ptr, pos_ptr, tokpos_ptr, out_ptr, vocab_start, pos_offset, V, M,
                       B, S, H, WRITE_PROMPT: tl.constexpr, SEQ_FIRST: tl.constexpr, HAS_POS: tl.constexpr,
                       PER_TOKEN: tl.constexpr, BLOCK_H: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs < H
    v = tl.load(ids_ptr + p) - vocab_start
    slot = tl.load(slot_ptr + p).to(tl.int64)
    # scalar predicates broadcast to the block first (the interpreter rejects scalar & block masks)
    zero_i = tl.zeros([BLOCK_H], dtype=tl.int32)
    prompt = (zero_i + (slot >= 0).to(tl.int32)) != 0
    local = (zero_i + ((v >= 0) & (v < V)).to(tl.int32)) != 0
    row = tl.load(w_ptr + v * H + offs, mask=hmask & local & ~prompt, other=0.0)
    if WRITE_PROMPT:
        valid = (zero_i + (slot < M).to(tl.int32)) != 0
        t = tl.load(tab_ptr + slot * H + offs, mask=hmask & prompt & valid, other=0.0)
        row = tl.where(prompt, t.to(row.dtype), row)
    else:
        row = tl.where(prompt, tl.zeros_like(row), row)
    if HAS_POS:  # in fp32, rounded once to the output dtype (as torch adds two bf16 tensors)
        if PER_TOKEN:  # a packed batch: each token's own position id
            q = tl.load(tokpos_ptr + p)
        else:
            q = pos_offset + p % S
        pe = tl.load(pos_ptr + q * H + offs, mask=hmask, other=0.0)
        row = (row.to(tl.float32) + pe.to(tl.float32)).to(row.dtype)
    if SEQ_FIRST:
        r = (p % S) * B + p // S
    else:
        r = p
    tl.store(out_ptr + r * H + offs, row, mask=hmask)

@triton.jit
def _splice_bwd_kernel(grad_ptr, slot_ptr, gt_ptr, P, B, S, H, SEQ_FIRST: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    # one program per (slot, column block): scans the slot map in position order and loads only
    # the gradient rows of its slot; fixed tile order and reduction tree, no atomics
    m = tl.program_id(0)
    offs_h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        sl = tl.load(slot_ptr + offs_p, mask=offs_p < P, other=-1)
        hit = sl == m
        if SEQ_FIRST:
            r = (offs_p % S) * B + offs_p // S
        else:
            r = offs_p
        g = tl.load(grad_ptr + r[:, None] * H + offs_h[None, :], mask=hit[:, None] & hmask[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(gt_ptr + m.to(tl.int64) * H + offs_h, acc, mask=hmask)


def _block_h(H: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(H, 1))))


def forward(ids_BS, slot_BS, weight_VH, vocab_start, table_MH, write_prompt, seq_first, pos_TH, pos_offset,
            position_BS=None):
    (B, S), (V, H) = ids_BS.shape, weight_VH.shape
    out = weight_VH.new_empty((S, B, H) if seq_first else (B, S, H))
    if B * S and H:
        bh = _block_h(H)
        _splice_fwd_kernel[(B * S, triton.cdiv(H, bh))](
            ids_BS, slot_BS, weight_VH, table_MH.float().contiguous(), weight_VH if pos_TH is None else pos_TH,
            ids_BS if position_BS is None else position_BS, out, vocab_start, pos_offset, V, table_MH.shape[0], B, S,
            H, WRITE_PROMPT=write_prompt, SEQ_FIRST=seq_first, HAS_POS=pos_TH is not None,
            PER_TOKEN=pos_TH is not None and position_BS is not None, BLOCK_H=bh)
    return out


def table_grad(grad, slot_BS, num_slots, seq_first):
    (B, S), H = slot_BS.shape, grad.shape[-1]
    gt = torch.zeros((num_slots, H), dtype=torch.float32, device=grad.device)
    if num_slots and H:
        bh = min(_block_h(H), 256)
        _splice_bwd_kernel[(num_slots, triton.cdiv(H, bh))](grad, slot_BS, gt, B * S, B, S, H, SEQ_FIRST=seq_first,
                                                            BLOCK_P=32, BLOCK_H=bh)
    return gt
