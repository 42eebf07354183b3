"""One forward's tensors, as the data loader makes them (``collate.py`` padded, ``packing.py`` packed).

Shape suffixes (the legend is in the README's architecture section): B sequences in the forward
(padded: one per example; packed: the packed rows), S positions per sequence, E examples (one
target and label each), N prompt tokens (entries of the prompt plan); with candidate scoring
(data/scoring.py) the targets are Q scored tokens and the labels X examples' gold candidates of K.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    prompt_rows_N: torch.Tensor  # the prompt plan: row, position and slot of every prompt token
    prompt_pos_N: torch.Tensor
    prompt_slots_N: torch.Tensor
    slot_BS: torch.Tensor  # the same plan as a map: the prompt slot at each position, -1 elsewhere (int32)
    target_pos_E: torch.Tensor  # position whose hidden state predicts each example's target
    label_E: torch.Tensor  # index into the candidates
    n_tokens: int  # real (non-pad) tokens, a host int: tokens/s without a device sync
    groups: list[str] = field(default_factory=list)
    target_row_E: torch.Tensor | None = None  # the sequence holding each target (packed: its bin; else e)
    position_BS: torch.Tensor | None = None  # packed batches only (data/packing.py): position ids
    segment_BS: torch.Tensor | None = None  # and segments (0: the shared prefix, k >= 1: a row, -1: pad)
    # candidate scoring (data/scoring.py): the targets above are then Q scored tokens, labels per example
    score_tokens_Q: torch.Tensor | None = None  # the token each scored position predicts
    score_seq_Q: torch.Tensor | None = None  # x * K + k: the example and candidate it belongs to
    cand_valid_XK: torch.Tensor | None = None  # False: padding (the example has fewer candidates)
    cand_len_XK: torch.Tensor | None = None  # tokens of each candidate (float: the mean score divides by it)

    def to(self, device) -> "Batch":
        moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return Batch(**moved)
