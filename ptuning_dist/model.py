"""The P-tuning model: prompt source -> splice -> frozen backbone -> head at target positions.

One forward per micro-batch::

    table_MH   = prompt()                          once per step, fp32 (the encoder or an exported table)
    embeds_BSH = splice(ids, plan, word_emb, table)  prompt rows at prompt positions
    hidden_EH  = backbone.hidden_at(embeds, mask, target_pos)   packed batches: one prefix, no padding
    logits_EK  = backbone.head(hidden_EH, candidates)   K = verbalizer / allowed ids, or V

The loss and evaluation read the SAME logits (the hidden state of the position just before the
target), so what is trained is what is scored. ``FrozenLM`` (splice + backbone + head) holds every
frozen parameter and nothing trainable: it is what ``ptuning_dist.parallel`` shards, while the
prompt encoder stays outside it, replicated. Nothing here knows about parallelism beyond whether
this is a first and/or last pipeline stage (the backbone says).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptuning_dist.data.batch import Batch


class FrozenLM(nn.Module):
    """Splice, frozen backbone and head in one module (the word-embedding lookup must sit inside
    the module ZeRO-3 wraps, so that its partitioned table is gathered for the lookup)."""

    def __init__(self, backbone: nn.Module, candidate_ids_K: torch.Tensor | None, splice: str = "fused"):
        super().__init__()
        self.backbone = backbone
        self.splice_kind = splice  # 'fused' (ptuning::splice) or 'reference'
        self.mean_score = False  # candidate scoring: the mean of a candidate's token log-probs, not the sum
        self.register_buffer("candidate_ids_K", candidate_ids_K, persistent=False)

    def forward(self, ids_BS, attention_mask_BS, slot_BS, prompt_rows_N, prompt_pos_N, prompt_slots_N,
                target_pos_E, table_MH, target_row_E=None, position_BS=None, segment_BS=None,
                score_tokens_Q=None, score_seq_Q=None, cand_valid_XK=None, cand_len_XK=None):
        """Logits (E x K) on the last pipeline stage; on an earlier one, its [s, b, h] output.
        ``target_row_E``/``position_BS``/``segment_BS``: a packed batch (data/packing.py).
        ``score_*``/``cand_*``: candidate answers scored token by token (data/scoring.py): the
        "logits" are then each example's K candidate scores (X x K)."""
        inputs = None  # a later pipeline stage starts from the activations it received
        if self.backbone.is_first_stage:  # the backbone's input layout: [b, s, h] (HF) or [s, b, h] (megatron)
            if self.splice_kind == "fused":
                inputs = self.backbone.splice(ids_BS, slot_BS, table_MH, position_BS)
            else:  # the oracle: look up every token, then insert the prompt rows
                inputs = self.backbone.reference_splice(ids_BS, prompt_rows_N, prompt_pos_N, prompt_slots_N, table_MH,
                                                        position_BS)
        hidden = self.backbone.hidden_at(inputs, attention_mask_BS, target_pos_E, target_row_E, position_BS, segment_BS)
        if not self.backbone.is_last_stage:
            return hidden
        if score_tokens_Q is None:
            return self.backbone.head(hidden, self.candidate_ids_K)
        return candidate_scores(self.backbone.head(hidden, None), score_tokens_Q, score_seq_Q, cand_valid_XK,
                                cand_len_XK if self.mean_score else None)

    def set_input_tensor(self, input_tensor) -> None:
        """A later pipeline stage's input, from megatron's schedule (see parallel/pipeline.py)."""
        self.backbone.set_input_tensor(input_tensor)


def candidate_scores(logits_QV, tokens_Q, seq_Q, valid_XK, len_XK=None) -> torch.Tensor:
    """Each candidate's summed (``len_XK``: mean) log-probability of its tokens, X x K; padded
    candidates -inf. Fixed shapes from the loader: no host sync."""
    logp_Q = torch.log_softmax(logits_QV, dim=-1).gather(1, tokens_Q[:, None]).squeeze(1)
    X, K = valid_XK.shape
    scores_XK = torch.zeros(X * K, dtype=logp_Q.dtype, device=logp_Q.device).index_add(0, seq_Q, logp_Q).view(X, K)
    if len_XK is not None:
        scores_XK = scores_XK / len_XK
    return scores_XK.masked_fill(~valid_XK, float("-inf"))


class PTuningModel(nn.Module):
    def __init__(self, backbone: nn.Module, prompt: nn.Module | None, candidate_ids_K: torch.Tensor | None,
                 splice: str = "fused"):
        super().__init__()
        self.frozen = FrozenLM(backbone, candidate_ids_K, splice)
        self.prompt = prompt  # None: the manual baseline, or a pipeline stage after the first

    @property
    def backbone(self) -> nn.Module:
        return self.frozen.backbone

    @property
    def candidate_ids_K(self) -> torch.Tensor | None:
        return self.frozen.candidate_ids_K

    def logits(self, batch: Batch, table_MH: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32, E x K). Pass ``table_MH`` to reuse one encoder output across the
        micro-batches of a step; by default the prompt source is run here."""
        if table_MH is None:
            if self.prompt is None:
                table_MH = torch.zeros((0, self.backbone.hidden_size), device=batch.ids_BS.device)
            else:
                table_MH = self.prompt()
        return self.frozen(batch.ids_BS, batch.attention_mask_BS, batch.slot_BS, batch.prompt_rows_N,
                           batch.prompt_pos_N, batch.prompt_slots_N, batch.target_pos_E, table_MH,
                           batch.target_row_E, batch.position_BS, batch.segment_BS, batch.score_tokens_Q,
                           batch.score_seq_Q, batch.cand_valid_XK, batch.cand_len_XK)

    def loss(self, batch: Batch, table_MH: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(self.logits(batch, table_MH), batch.label_E, reduction=reduction)
