"""The P-tuning model: prompt source -> splice -> frozen backbone -> head at target positions.

One forward per micro-batch::

    table_MH   = prompt()                          once per step, fp32 (the encoder or an exported table)
    embeds_BSH = splice(ids, plan, word_emb, table)  prompt rows at prompt positions
    hidden_BH  = backbone.hidden_at(embeds, mask, target_pos)
    logits_BK  = backbone.head(hidden_BH, candidates)   K = verbalizer / allowed ids, or V

The loss and evaluation read the SAME logits (the hidden state of the position just before the
target), so what is trained is what is scored. Nothing here knows about parallelism.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptuning_dist.data.collate import Batch
from ptuning_dist.ops.splice import splice_reference


class PTuningModel(nn.Module):
    def __init__(self, backbone: nn.Module, prompt: nn.Module | None, candidate_ids_K: torch.Tensor | None):
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt  # None: the manual baseline (a template with no prompt slots)
        self.register_buffer("candidate_ids_K", candidate_ids_K, persistent=False)

    def logits(self, batch: Batch, table_MH: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32, B x K). Pass ``table_MH`` to reuse one encoder output across the
        micro-batches of a step; by default the prompt source is run here."""
        word_VH = self.backbone.word_embeddings_VH
        if self.prompt is None:
            table_MH = word_VH.new_zeros((0, word_VH.shape[1]))
        elif table_MH is None:
            table_MH = self.prompt()
        embeds_BSH = splice_reference(
            batch.ids_BS, batch.prompt_rows_N, batch.prompt_pos_N, batch.prompt_slots_N, word_VH, table_MH
        )
        hidden_BH = self.backbone.hidden_at(embeds_BSH, batch.attention_mask_BS, batch.target_pos_B)
        return self.backbone.head(hidden_BH, self.candidate_ids_K)

    def loss(self, batch: Batch, table_MH: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch, table_MH), batch.label_B)
