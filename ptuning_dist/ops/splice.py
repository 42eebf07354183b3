"""The embedding splice: vocabulary rows everywhere, prompt-table rows at prompt positions.

This pure-PyTorch version is the reference (and the oracle for any fused kernel). The prompt
plan is the flat list of (row, position, slot) triplets the collator computed on the CPU, so the
step never searches for prompt tokens (no ``.nonzero()``, no host sync) and rows may hold
different numbers of prompt tokens.

Gradient flows only to the prompt table: the word-embedding table is read detached, and prompt
positions hold a placeholder id (the pad id) that the splice overwrites, so no pseudo-token id
ever indexes the vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def splice_reference(
    ids_BS: torch.Tensor,
    prompt_rows_N: torch.Tensor,
    prompt_pos_N: torch.Tensor,
    prompt_slots_N: torch.Tensor,
    word_embeddings_VH: torch.Tensor,
    table_MH: torch.Tensor,
) -> torch.Tensor:
    """Return embeds_BSH in the word embeddings' dtype.

    Costs one embedding lookup (B x S x H) plus an out-of-place ``index_put`` of N rows; the
    table is cast to the backbone dtype here so the encoder itself stays fp32.
    """
    embeds_BSH = F.embedding(ids_BS, word_embeddings_VH.detach())
    return insert_prompt_rows(embeds_BSH, prompt_rows_N, prompt_pos_N, prompt_slots_N, table_MH)


def insert_prompt_rows(embeds_BSH, prompt_rows_N, prompt_pos_N, prompt_slots_N, table_MH) -> torch.Tensor:
    """The splice's second half, for backbones whose lookup is not one table (a vocabulary-parallel
    table looks up its shard and all-reduces over tensor parallelism first)."""
    rows_NH = table_MH.to(embeds_BSH.dtype)[prompt_slots_N]
    return embeds_BSH.index_put((prompt_rows_N, prompt_pos_N), rows_NH)
