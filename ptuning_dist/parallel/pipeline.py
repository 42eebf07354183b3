"""Pipeline parallelism: megatron-core's 1F1B schedule drives the frozen stages of one pipeline.

The prompt encoder lives on the first stage only (later stages hold no trainable parameter, no
optimizer, no encoder state in checkpoints). Per optimizer step, on every rank of a pipeline::

    stage 0:      table_leaf = encoder().detach().requires_grad_()      (train/recipe.py)
    every stage:  1F1B over this DP rank's micro-batches (same ids, mask and plan on every stage,
                  collated by each rank's own loader: no data is sent down the pipeline)
                    stage 0  : splice(ids, plan, table_leaf) -> its layers -> send [s, b, h]
                    stage k  : recv [s, b, h] -> its layers -> send
                    last     : recv -> its layers -> final norm -> head at targets -> loss / n
                  backward the same way back; stage 0's ends in table_leaf.grad
    stage 0:      DP all-reduce of table_leaf.grad, encoder backward, optimizer  (train/recipe.py)

What the schedule needs and where it comes from:
- one activation shape per step: the loader pads every micro-batch of a step to the step's
  longest row (``collate(..., seq_len=)``; packed: to the largest packed forward), host-side ints,
  so no shape is ever exchanged;
- received activations that require grad: megatron's p2p makes its receive buffers with
  ``requires_grad=True``, so stage k's input gradient flows back (a stage whose input did not
  require grad would silently give the encoder zero gradients: tested against PP = 1);
- ``model.config`` (megatron's TransformerConfig: ``pipeline_dtype``, ``batch_p2p_comm=False``),
  ``model.model_type`` and ``model.set_input_tensor``: this class provides them.

The loss is the same as at PP = 1: the mean over the step's rows (each micro-batch's mean weighted by
its rows; megatron divides by ``num_microbatches`` in its loss hook). Packed forwards are padded to
the step's largest (``data.packing.pad_packed``), so they too share one shape. The interleaved
(virtual-pipeline) schedule is not offered.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ptuning_dist.data.batch import Batch
from ptuning_dist.model import PTuningModel


class PipelineSchedule:
    """megatron-core's 1F1B schedule over this rank's stage of ``model``."""

    def __init__(self, model: PTuningModel):
        from megatron.core import parallel_state as ps
        from megatron.core.enums import ModelType
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model = model
        self.config = model.backbone.gpt.config
        self.model_type = ModelType.encoder_or_decoder
        self.forward_backward = get_forward_backward_func()
        self.is_last = model.backbone.is_last_stage
        self.group = ps.get_pipeline_model_parallel_group()
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()

    def set_input_tensor(self, input_tensor) -> None:
        self.model.frozen.set_input_tensor(input_tensor)

    def _run(self, batches: list[Batch], table_MH, loss_func, forward_only: bool) -> list:
        shapes = {tuple(b.ids_BS.shape) for b in batches}
        assert len(shapes) == 1, f"one activation shape per schedule call, got {shapes} (collate with seq_len=)"
        B, S = shapes.pop()

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            out = self.model.logits(batch, table_MH)  # logits on the last stage, else [s, b, h]
            return out, (partial(loss_func, batch) if loss_func is not None else None)

        return self.forward_backward(forward_step_func=forward_step, data_iterator=iter(batches), model=self,
                                     num_microbatches=len(batches), seq_length=S, micro_batch_size=B,
                                     forward_only=forward_only)

    def train_step(self, batches: list[Batch], table_leaf: torch.Tensor | None) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches (stage 0: into ``table_leaf.grad``).
        Returns the step's mean loss on the last stage, zero on the others. Each micro-batch's mean
        loss is weighted by its share of the step's rows (packed forwards hold different numbers
        of rows), times the count megatron divides by: the step's loss is the mean over its rows,
        as at PP = 1. Equal micro-batches weigh exactly 1.0 (the padded layout's bits unchanged)."""
        step_loss = torch.zeros((), device=batches[0].ids_BS.device)
        rows = sum(len(b.label_E) for b in batches)

        def loss_func(batch: Batch, logits_EK: torch.Tensor):
            weight = len(batch.label_E) * len(batches) / rows  # host ints
            loss = F.cross_entropy(logits_EK, batch.label_E) * weight
            step_loss.add_(loss.detach() / len(batches))  # before megatron divides ``loss`` in place
            return loss, {}

        self._run(batches, table_leaf, loss_func, forward_only=False)
        return step_loss

    @torch.no_grad()
    def outputs(self, batch: Batch, table_MH: torch.Tensor | None, summary) -> list:
        """``summary(logits)`` of one batch (its predictions), on every stage: the last stage
        computes, then broadcasts the host objects."""
        store = self._run([batch], table_MH, None, forward_only=True)
        preds = [summary(store[0]) if self.is_last else None]  # host sync: evaluation only
        dist.broadcast_object_list(preds, src=self.last_rank, group=self.group)
        return preds[0]
