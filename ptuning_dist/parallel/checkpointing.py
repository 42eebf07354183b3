"""Activation checkpointing per transformer block, applied from outside the model.

Each block of the frozen backbone is wrapped with torch's non-reentrant ``checkpoint_wrapper``:
its activations are dropped after the forward and recomputed in the backward, so a step costs
about one extra forward of the backbone and keeps only the block inputs alive.

Non-reentrant on purpose: reentrant checkpointing around a region whose inputs do not require
grad silently yields no gradients, and it ignores keyword arguments (attention masks, RoPE
tables) that HF blocks take. The recompute is deterministic, so losses and gradients are
bit-identical with checkpointing on and off (tested).
"""
from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from ptuning_dist.errors import ConfigError


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of blocks: the one whose length is the config's layer count."""
    cfg = model.config  # HF: num_hidden_layers / n_layer; megatron TransformerConfig: num_layers
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or getattr(cfg, "num_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ConfigError(f"activation checkpointing: found no list of {n} transformer blocks in "
                      f"{type(model).__name__}")


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block in place; returns how many were wrapped."""
    blocks = transformer_blocks(model)
    wrap = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    for i, block in enumerate(blocks):
        blocks[i] = wrap(block)
    return len(blocks)
