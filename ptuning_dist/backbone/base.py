"""The backbone protocol: what the P-tuning model needs of a frozen backbone (one pipeline stage).

Two implementations: ``HFBackbone`` (any Hugging Face causal LM, never pipelined) and
``MegatronBackbone`` (one TP-sharded pipeline stage of a megatron-core GPTModel, imported from
Hugging Face by its family file). Neither holds parallel code: sharding, checkpoint wrapping and
pipeline schedules are applied from outside by ``ptuning_dist.parallel.parallelize``.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Backbone(Protocol):
    hidden_size: int
    is_first_stage: bool  # holds the embeddings: splices the prompt rows in
    is_last_stage: bool  # holds the final norm and the head: returns hidden states at the targets

    @property
    def model(self) -> nn.Module:
        """The wrapped model (HF causal LM or megatron GPTModel): what the parallel wrappers act on."""

    @property
    def dtype(self) -> torch.dtype: ...

    def splice(self, ids_BS: torch.Tensor, slot_BS: torch.Tensor, table_MH: torch.Tensor,
               position_BS: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's input by the fused op: word rows, prompt-table rows at prompt slots (and
        learned positions, where the backbone adds them there: per token for a packed batch)."""

    def reference_splice(self, ids_BS, prompt_rows_N, prompt_pos_N, prompt_slots_N, table_MH,
                         position_BS=None) -> torch.Tensor:
        """The same input, the oracle way: look every token up, then insert the prompt rows."""

    def hidden_at(self, inputs: torch.Tensor | None, attention_mask_BS: torch.Tensor, target_pos_E: torch.Tensor,
                  target_row_E: torch.Tensor | None = None, position_BS: torch.Tensor | None = None,
                  segment_BS: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's layers. Last stage: the final-norm hidden state at each example's target
        (E x H); earlier stages: the activations for the next one. ``target_row_E``, ``position_BS``
        and ``segment_BS`` describe a packed batch (``data/packing.py``)."""

    def head(self, hidden_EH: torch.Tensor, candidate_ids_K: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits over the candidate ids (E x K), or over the whole vocabulary when None."""

    def external_weights(self) -> list[nn.Parameter]:
        """The frozen weights used outside their own module's forward (read as tensors by the
        splice and the head, or returned by a layer for its caller to add): a wrapper that gathers
        weights per module (ZeRO-3) must gather these for the whole frozen forward."""

    def set_input_tensor(self, input_tensor) -> None:
        """A later pipeline stage's input, handed over by the pipeline schedule."""


def freeze(module: nn.Module) -> None:
    """Freeze every parameter; done before anything wraps or shards the backbone."""
    for p in module.parameters():
        p.requires_grad_(False)
