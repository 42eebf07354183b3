"""Packing a micro-batch: one copy of the rows' shared prefix, several rows to a sequence, no padding.

A P-tuning template that opens with prompt tokens (``[P*m] {x} ...``; PEFT's layout) gives every
row of a batch the same first m tokens, and literal anchors can lengthen that prefix. Under causal
attention those positions' hidden states are identical in every row, so the padded layout computes
them B times. A packed row ("bin") holds the prefix once, then the rest (the "suffix") of each row
placed in it, then padding to the longest bin::

    ids      [P][P][P][P][P][P] | Paris is [MASK-1] | the Nile flows ... [MASK-1] | pad pad
    position  0  1  2  3  4  5  |  6    7           |  6   7    8   ...           |  0   0
    segment   0  0  0  0  0  0  |  1    1           |  2   2    2   ...           | -1  -1

Token i attends to token j iff ``pos_j <= pos_i`` and (``seg_j == seg_i`` or ``seg_j == 0 < seg_i``):
every row sees exactly its own prefix and its own earlier tokens, with its own position ids, as in
the padded layout, so the loss and the prompt gradient are the same sums (float order aside;
tested against the padded layout). The prefix's gradient collects every row's contribution
through attention, as the padded layout's B copies sum theirs in the splice's backward.

What it saves: LAMA-style rows (~6 prompt + 2-3 input tokens) shrink to ~1/3 of their positions;
rows of uneven length (SuperGLUE) lose their padding. And since a packed micro-batch is smaller than
the padded one the user sized ``micro_batch_size`` for, ``step_forwards`` fills each forward up to
that padded size (``micro_batch_size`` x the step's longest row, in positions): fewer, fuller
forwards, each reading the frozen weights once (at small batches the GEMMs are bound by those reads),
never more activation memory than a padded micro-batch. Costs: attention inside a bin is over the
bin's length (bins are capped at ``capacity``, default ``data.max_seq_len``, so no worse than a
padded row of that length), and the backbone builds a B' x T x T boolean mask per forward from the
position and segment maps (on the device; the loader ships only B' x T ints).

All of this runs in the data loader; the step reads ready-made tensors and never syncs the host.
"""
from __future__ import annotations

import torch

from ptuning_dist.data.batch import Batch


def _common_prefix(a, b) -> int:
    """Leading positions where rows a and b have the same token (id, and prompt slot or none)."""
    sa, sb = dict(zip(a.prompt_pos, a.prompt_slot)), dict(zip(b.prompt_pos, b.prompt_slot))
    n, p = min(len(a.ids), len(b.ids)), 0
    while p < n and a.ids[p] == b.ids[p] and sa.get(p, -1) == sb.get(p, -1):
        p += 1
    return p


def shared_prefix_len(encs) -> int:
    """The number of leading positions where every row has the same token (the same id, and the
    same prompt slot or none)."""
    return min(_common_prefix(encs[0], e) for e in encs)


def assign_bins(lengths: list[int], prefix: int, capacity: int) -> list[list[int]]:
    """First-fit decreasing: rows (by index) into bins of at most ``capacity`` positions, each bin
    ``prefix`` + the suffixes of its rows. Deterministic (ties keep the batch order)."""
    bins, used = [], []
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        n = lengths[b] - prefix
        for k in range(len(bins)):
            if used[k] + n <= capacity:
                bins[k].append(b)
                used[k] += n
                break
        else:
            bins.append([b])
            used.append(prefix + n)
    return bins


def _plan(encs, capacity: int) -> tuple[int, list[list[int]], int]:
    """(shared prefix length, bins of row indices, longest bin): the packed layout of these rows."""
    lengths = [len(e.ids) for e in encs]
    P = shared_prefix_len(encs)
    bins = assign_bins(lengths, P, max(capacity, max(lengths)))
    return P, bins, max(P + sum(lengths[b] - P for b in members) for members in bins)


def packed_size(examples, capacity: int) -> int:
    """Positions (bins x longest bin) that ``pack`` would compute for these examples."""
    _, bins, T = _plan([e.enc for e in examples], capacity)
    return len(bins) * T


def forward_groups(rows: list, budget: int, capacity: int) -> list[list]:
    """Consecutive rows into groups whose packed size stays within ``budget`` positions (a row
    longer than the budget gets a group of its own): a group ends before the first row that would
    take it over. While a group fits one packed row its size is (sum of lengths) - (rows - 1) x
    (shared prefix), kept up to date in O(1) per row; only past ``capacity`` (several packed rows,
    padded to the longest) is the exact ``packed_size`` computed."""
    groups, cur, total, P = [], [], 0, 0
    for r in rows:
        n = len(r.enc.ids)
        if cur:
            P2 = min(P, _common_prefix(cur[0].enc, r.enc))
            size = total + n - len(cur) * P2  # exact for one packed row, a lower bound for several
            if size <= budget and (size <= capacity or packed_size(cur + [r], capacity) <= budget):
                cur.append(r)
                total, P = total + n, P2
                continue
            groups.append(cur)
        cur, total, P = [r], n, n
    return groups + ([cur] if cur else [])


def step_forwards(rows_by_rank: list[list], rank: int, micro: int, capacity: int) -> list[list]:
    """This rank's rows of a step cut into forwards: each forward packed within ``micro`` x the
    step's longest row positions, and as many forwards on every rank (ZeRO-3 gathers weights with
    collectives per forward): each rank computes every rank's count from the same global batch, no
    communication. A rank that needs fewer splits its largest groups in half."""
    longest = max(len(e.enc.ids) for rows in rows_by_rank for e in rows)
    budget = micro * longest
    per_rank = [forward_groups(rows, budget, capacity) for rows in rows_by_rank]
    n, groups = max(map(len, per_rank)), per_rank[rank]
    while len(groups) < n:  # n <= rows per rank, so a group of >= 2 rows exists
        k = max(range(len(groups)), key=lambda i: len(groups[i]))
        g = groups.pop(k)
        groups[k:k] = [g[: len(g) // 2], g[len(g) // 2:]]
    return groups


def pack(seqs, examples, pad_id: int, capacity: int):
    """A packed ``Batch`` (B' bins x T positions) of these sequences (``data/scoring.py``: one per
    example, or one per candidate); labels and groups stay in the examples' order, targets in the
    sequences' (``target_row_E``/``target_pos_E`` say where each target is)."""
    encs = seqs
    lengths = [len(e.ids) for e in encs]
    P, bins, T = _plan(encs, capacity)
    nb = len(bins)
    ids = torch.full((nb, T), pad_id, dtype=torch.long)
    position = torch.zeros((nb, T), dtype=torch.long)
    segment = torch.full((nb, T), -1, dtype=torch.long)
    slot_map = torch.full((nb, T), -1, dtype=torch.int32)
    target_row, target_pos = [None] * len(encs), [None] * len(encs)
    first = encs[0]
    prefix_slots = [(p, s) for p, s in zip(first.prompt_pos, first.prompt_slot) if p < P]
    rows, pos, slots = [], [], []
    for k, members in enumerate(bins):
        ids[k, :P] = torch.tensor(first.ids[:P], dtype=torch.long)
        position[k, :P] = torch.arange(P)
        segment[k, :P] = 0
        for p, s in prefix_slots:
            slot_map[k, p] = s
            rows.append(k), pos.append(p), slots.append(s)
        c = P  # where the next suffix starts in this bin
        for seg, b in enumerate(members, start=1):
            e, n = encs[b], lengths[b] - P
            ids[k, c:c + n] = torch.tensor(e.ids[P:], dtype=torch.long)
            position[k, c:c + n] = torch.arange(P, lengths[b])
            segment[k, c:c + n] = seg
            for p, s in zip(e.prompt_pos, e.prompt_slot):
                if p >= P:
                    slot_map[k, c + p - P] = s
                    rows.append(k), pos.append(c + p - P), slots.append(s)
            target_row[b] = [k] * len(e.targets)
            target_pos[b] = [c + t - P if t >= P else t for t in e.targets]  # a target inside the prefix is shared
            c += n
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Batch(
        ids_BS=ids,
        attention_mask_BS=(segment >= 0).long(),
        prompt_rows_N=t(rows),
        prompt_pos_N=t(pos),
        prompt_slots_N=t(slots),
        slot_BS=slot_map,
        target_pos_E=t([p for ps in target_pos for p in ps]),
        label_E=t([e.label for e in examples]),
        n_tokens=sum(lengths),  # the rows' tokens, as unpacked: tokens/s stays comparable across layouts
        groups=[e.group for e in examples],
        target_row_E=t([r for rs in target_row for r in rs]),
        position_BS=position,
        segment_BS=segment,
    )


def pad_packed(batch: Batch, B: int, T: int, pad_id: int) -> Batch:
    """The packed ``batch`` grown to B rows x T positions with padding (segment -1, position 0,
    no prompt slot, mask 0): a pipeline sends one activation shape per step, so the step's packed
    forwards are padded to the largest of them (host ints from the shapes: no communication, every
    stage computes the same). Targets and labels are unchanged; padding attends to padding only."""
    b, t = batch.ids_BS.shape
    assert batch.position_BS is not None and B >= b and T >= t, "pad_packed: a packed batch, grown only"
    if (B, T) == (b, t):
        return batch

    def grow(x, fill):
        out = torch.full((B, T), fill, dtype=x.dtype)
        out[:b, :t] = x
        return out

    fields = dict(vars(batch))
    fields.update(ids_BS=grow(batch.ids_BS, pad_id),
                  attention_mask_BS=grow(batch.attention_mask_BS, 0), slot_BS=grow(batch.slot_BS, -1),
                  position_BS=grow(batch.position_BS, 0), segment_BS=grow(batch.segment_BS, -1))
    return Batch(**fields)


def packed_attention_mask(position_BS: torch.Tensor, segment_BS: torch.Tensor) -> torch.Tensor:
    """B x 1 x T x T booleans (True: may attend) for a packed batch; see the module docstring.
    Padding (segment -1, position 0) attends to padding only, so no softmax row is empty."""
    pos_i, pos_j = position_BS[:, :, None], position_BS[:, None, :]
    seg_i, seg_j = segment_BS[:, :, None], segment_BS[:, None, :]
    return ((pos_j <= pos_i) & ((seg_i == seg_j) | ((seg_j == 0) & (seg_i > 0))))[:, None]
