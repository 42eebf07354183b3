"""A frozen megatron-core GPTModel (local layer spec) behind the backbone protocol
(``backbone/base.py``): one pipeline stage of it, TP-sharded, read shard-wise from Hugging Face
safetensors at load time (``megatron_import.py`` and the family files: GPT-2 style, with learned positions, GELU-tanh,
LayerNorm and fused QKV; LLaMA style, with RMSNorm, SwiGLU, RoPE and grouped-query attention).

A stage holds layers [s L/pp, (s+1) L/pp). ``hidden_at`` runs them: the first stage takes the
spliced embeddings, later stages the activations megatron's schedule received and handed over
through ``set_input_tensor``; the last stage returns the final-norm hidden state at the target
positions, the others the whole [s, b, h] activation for the next stage.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ptuning_dist.ops.splice import insert_prompt_rows
from ptuning_dist.planning.shape import padded_vocab


def _tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


class MegatronBackbone(nn.Module):
    """One frozen pipeline stage of a GPTModel (all of it at pp = 1), fed spliced embeddings."""

    def __init__(self, gpt: nn.Module, vocab_size: int):
        super().__init__()
        for p in gpt.parameters():
            p.requires_grad_(False)
        self.gpt = gpt
        self.vocab_size = vocab_size  # the real vocabulary (the shards may be zero-padded)
        self.hidden_size = gpt.config.hidden_size
        self.is_first_stage, self.is_last_stage = gpt.pre_process, gpt.post_process

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32) -> "MegatronBackbone":
        """This rank's TP shard of its pipeline stage of a Hugging Face model directory of a family
        with a megatron importer (``backbone/families``), read shard-wise from its safetensors
        (``megatron_import.build_stage``) or from a megatron-core ``torch_dist`` checkpoint
        (``megatron_dist.load_stage``). ``load_report`` says what was read."""
        from megatron.core import parallel_state as ps

        from ptuning_dist.backbone.megatron_dist import is_torch_dist, load_stage
        from ptuning_dist.backbone.megatron_import import build_stage, hf_config
        from ptuning_dist.compat import megatron_cpu

        megatron_cpu.enable()
        load = load_stage if is_torch_dist(model_dir) else build_stage
        gpt, report = load(model_dir, dtype, ps.get_tensor_model_parallel_world_size(),
                                  ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
                                  ps.get_pipeline_model_parallel_rank())
        bb = cls(gpt, hf_config(model_dir).vocab_size)
        bb.load_report = report
        return bb

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's schedule hands a later stage its received activations here."""
        self.gpt.set_input_tensor(input_tensor)

    def hidden_at(self, inputs_SBH, attention_mask_BS, target_pos_E, target_row_E=None, position_BS=None,
                  segment_BS=None) -> torch.Tensor:
        """This stage's layers. First stage: ``inputs_SBH`` is the decoder input the splice wrote
        (word or prompt rows plus learned positions, [s, b, h]; RoPE is applied inside attention);
        later stages read the received activations (``inputs_SBH`` is None). Last stage: the hidden
        state at the targets (E x H; ``target_row_E`` says which row holds each), else the [s, b, h]
        activations for the next stage.

        Padded batches: right padding lies after every target, so the causal mask alone is exact.
        Packed batches (``position_BS``/``segment_BS``, data/packing.py): megatron-core's local
        attention takes the packed mask (prefix + own row, causal in position; True = masked, as
        megatron's ``attention_mask_func`` fills it) as a [b, 1, s, s] tensor, no Transformer Engine
        needed; RoPE rotates each token by its own position (the [s, 1, 1, d] frequencies indexed
        per token: [s, b, 1, d], which megatron's unfused bshd rotation broadcasts over heads).
        Every stage builds the same mask from the same loader tensors, so nothing more is sent down
        the pipeline. Cost: a B x S x S boolean mask per forward (on the device)."""
        B, S = attention_mask_BS.shape
        device = attention_mask_BS.device
        rope = self.gpt.rotary_pos_emb(S) if self.gpt.position_embedding_type == "rope" else None
        if position_BS is not None:
            from ptuning_dist.data.packing import packed_attention_mask

            masked = ~packed_attention_mask(position_BS, segment_BS)
            if rope is not None:  # positions < S: a token's position never exceeds its column
                rope = rope[:, 0][position_BS.t()]
        else:
            masked = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool, device=device), diagonal=1)
        hidden_SBH = self.gpt.decoder(hidden_states=inputs_SBH if self.is_first_stage else None,
                                      attention_mask=masked, rotary_pos_emb=rope)
        if not self.is_last_stage:
            return hidden_SBH
        if target_row_E is None:
            target_row_E = torch.arange(B, device=device)
        return hidden_SBH[target_pos_E, target_row_E]  # several targets per row: packing, candidate scoring

    def external_weights(self) -> list[nn.Parameter]:
        """Weights read as tensors, not through their module's forward (the vocabulary-parallel
        lookup, learned positions, the candidate-only head) or used outside it (the biases that
        megatron's linear layers return with ``skip_bias_add``, added by the layer that called
        them). A per-module gatherer that missed a returned bias would take it for a "dangling"
        parameter and never partition it again (seen with ZeRO-3)."""
        params = [m.bias for m in self.gpt.modules()
                  if getattr(m, "skip_bias_add", False) and isinstance(getattr(m, "bias", None), nn.Parameter)]
        if self.is_first_stage:
            params.append(self.gpt.embedding.word_embeddings.weight)
            if self._position_table() is not None:
                params.append(self._position_table())
        if self.is_last_stage:
            params.append(self._head_weight())
        return list({id(p): p for p in params}.values())

    @property
    def model(self) -> nn.Module:
        """The wrapped GPTModel (what parallel wrappers such as activation checkpointing act on)."""
        return self.gpt

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.config.params_dtype

    def _vocab_range(self) -> tuple[int, int]:
        rows = padded_vocab(self.vocab_size, self.gpt.config.tensor_model_parallel_size) // \
            self.gpt.config.tensor_model_parallel_size
        start = _tp_rank() * rows
        return start, start + rows

    def _position_table(self) -> torch.Tensor | None:
        return None if self.gpt.position_embedding_type == "rope" else self.gpt.embedding.position_embeddings.weight

    def reference_splice(self, ids_BS, prompt_rows_N, prompt_pos_N, prompt_slots_N, table_MH,
                         position_BS=None) -> torch.Tensor:
        """The oracle path, step by step: each TP rank looks up the ids in its vocabulary shard
        (zeros elsewhere), a sum over TP gives every rank the full word embeddings, the prompt rows
        are inserted, learned positions added (a packed batch's: ``position_BS``), then [b, s, h] ->
        [s, b, h]. The table is frozen, so the all-reduce needs no gradient path (the prompt rows
        come after it)."""
        from megatron.core import parallel_state as ps

        weight = self.gpt.embedding.word_embeddings.weight.detach()
        start, end = self._vocab_range()
        local = (ids_BS >= start) & (ids_BS < end)
        embeds_BSH = F.embedding((ids_BS - start).clamp(0, end - start - 1), weight) * local.unsqueeze(-1)
        if ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(embeds_BSH, group=ps.get_tensor_model_parallel_group())
        embeds_BSH = insert_prompt_rows(embeds_BSH, prompt_rows_N, prompt_pos_N, prompt_slots_N, table_MH)
        pos_TH = self._position_table()
        if pos_TH is not None and position_BS is not None:
            embeds_BSH = embeds_BSH + F.embedding(position_BS, pos_TH.detach())
        elif pos_TH is not None:
            embeds_BSH = embeds_BSH + pos_TH.detach()[: ids_BS.shape[1]].unsqueeze(0)
        return embeds_BSH.transpose(0, 1).contiguous()

    def splice(self, ids_BS, slot_BS, table_MH, position_BS=None) -> torch.Tensor:
        """The decoder input [s, b, h] in one pass of the fused op over this TP rank's vocabulary
        shard: its own vocabulary rows (zeros elsewhere), and on TP rank 0 only the prompt rows
        and the learned positions (per token for a packed batch: ``position_BS``); then a sum over
        TP (backward: the identity, so every TP rank computes the same table gradient). Bit-equal
        to ``reference_splice``."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        from ptuning_dist.ops.splice import splice

        start, end = self._vocab_range()
        owner = _tp_rank() == 0
        inputs_SBH = splice(ids_BS, slot_BS, self.gpt.embedding.word_embeddings.weight, table_MH, vocab_start=start,
                            vocab_size=(end - start) * self.gpt.config.tensor_model_parallel_size,
                            write_prompt=owner, seq_first=True, pos_weight_TH=self._position_table() if owner else None,
                            position_BS=position_BS)
        if ps.get_tensor_model_parallel_world_size() > 1:
            inputs_SBH = reduce_from_tensor_model_parallel_region(inputs_SBH)
        return inputs_SBH

    def head(self, hidden_EH: torch.Tensor, candidate_ids_K: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32) over the candidates (each TP rank scores those in its shard, then a sum
        whose backward is the identity), or over the whole real vocabulary (gathered shards)."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        weight = self._head_weight()
        # Each rank's shard gives only part of d(loss)/d(hidden): sum it over TP in the backward
        # (identity forward), as megatron's own vocabulary-parallel output layer does.
        hidden_EH = copy_to_tensor_model_parallel_region(hidden_EH)
        if candidate_ids_K is None:  # E x V: only E rows, so gathering the shards is cheap
            shard_EV = F.linear(hidden_EH, weight)
            if ps.get_tensor_model_parallel_world_size() > 1:
                # every TP rank computes the same loss from the gathered logits: the backward keeps
                # this rank's slice of the gradient (megatron's gather_from_tensor_model_parallel_region,
                # which allocates on CUDA), it must not sum the TP copies (torch.distributed.nn's
                # all_gather does: the encoder's gradient came out TP x too big)
                shard_EV = _GatherLastDim.apply(shard_EV, ps.get_tensor_model_parallel_group())
            return shard_EV[:, : self.vocab_size].float()
        start, end = self._vocab_range()
        local = (candidate_ids_K >= start) & (candidate_ids_K < end)
        rows = weight[(candidate_ids_K - start).clamp(0, end - start - 1)] * local.unsqueeze(-1)
        return reduce_from_tensor_model_parallel_region(F.linear(hidden_EH, rows)).float()

    def _head_weight(self) -> torch.Tensor:
        if self.gpt.share_embeddings_and_output_weights:
            return self.gpt.embedding.word_embeddings.weight
        return self.gpt.output_layer.weight

    def head_shard(self, hidden_EH: torch.Tensor) -> torch.Tensor:
        """This TP rank's slice of the vocabulary logits (tied or own vocabulary-parallel table)."""
        return F.linear(hidden_EH, self._head_weight()).float()


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim over a group; backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group), dim=-1)[rank].contiguous(), None
