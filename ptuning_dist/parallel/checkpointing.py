"""Activation checkpointing per transformer block, applied from outside the model.

Hugging Face backbones: each block is wrapped with torch's non-reentrant ``checkpoint_wrapper``.
megatron backbones: megatron's own full recompute, one layer per checkpoint (``recompute_granularity
= "full"``, ``recompute_method = "uniform"``, ``recompute_num_layers = 1``), set on the model's
config, which its TransformerBlock reads at every forward in training mode. Either way a block's
activations are dropped after the forward and recomputed in the backward: a step costs about one
extra forward of the backbone and keeps only the block inputs alive. Megatron's recompute is
reentrant (``tensor_parallel.checkpoint``): its input must require grad, which it does on every
stage (spliced prompt rows on the first, received activations on the others).

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
    """The ModuleList of blocks: megatron's (this pipeline stage's) decoder layers, or the one
    whose length is the config's layer count."""
    if hasattr(model, "decoder") and hasattr(model.decoder, "layers"):  # megatron GPTModel
        return model.decoder.layers
    cfg = model.config  # HF: num_hidden_layers / n_layer; megatron TransformerConfig: num_layers
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or getattr(cfg, "num_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ConfigError(f"activation checkpointing: found no list of {n} transformer blocks in "
                      f"{type(model).__name__}")


def apply_activation_checkpointing(backbone: nn.Module) -> int:
    """Checkpoint every block of ``backbone`` (HFBackbone or MegatronBackbone) in place; returns
    how many blocks of this pipeline stage will be recomputed."""
    model = backbone.model
    if hasattr(model.config, "recompute_granularity"):  # megatron's TransformerConfig
        model.config.recompute_granularity = "full"
        model.config.recompute_method = "uniform"
        model.config.recompute_num_layers = 1
        return len(model.decoder.layers)
    blocks = transformer_blocks(model)
    wrap = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    for i, block in enumerate(blocks):
        blocks[i] = wrap(block)
    return len(blocks)
