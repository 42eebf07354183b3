"""What the memory model and the layout rules need of a backbone: its shape, from config.json.

A family file (``ptuning_dist/backbone/families/``) parses its ``config.json`` into a
``ModelShape``; the shape's ``LayerStyle`` says how a megatron transformer layer of that family is
built (norm biases, linear biases, gated MLP, learned positions), so the memory model needs no
per-family code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class LayerStyle:
    """How a family's megatron layer is built."""

    norm_bias: bool  # LayerNorm (with bias) rather than RMSNorm
    linear_bias: bool  # every linear layer has a bias
    gated_mlp: bool  # fc1 is [gate; up] (SwiGLU)
    learned_positions: bool  # a learned position table (else RoPE)


VOCAB_MULTIPLE = 128  # megatron's make_vocab_size_divisible_by default


def padded_vocab(vocab: int, tp: int) -> int:
    """The vocabulary-parallel tables' rows: the vocabulary padded with zero rows to a multiple of
    lcm(128, TP). For every power-of-two TP up to 128 that is the same multiple of 128, so the
    tables have one global shape whatever the TP, and a ``torch_dist`` checkpoint written at one TP
    loads at another (megatron pads to 128 x TP, which ties its checkpoints to their TP)."""
    from math import lcm

    m = lcm(VOCAB_MULTIPLE, tp)
    return -(-vocab // m) * m


@dataclass(frozen=True)
class ModelShape:
    """A backbone's shape as megatron lays it out. ``style`` None: the family's own."""

    family: str  # the Hugging Face model_type
    layers: int
    hidden: int
    heads: int
    kv_groups: int
    ffn: int
    vocab: int
    max_positions: int
    tied_embeddings: bool
    style: LayerStyle | None = None
    kv_channels: int | None = None  # a head's width where config.json gives it (LLaMA's head_dim), else hidden / heads

    def __post_init__(self):
        if self.style is None:
            from ptuning_dist.backbone.families import family

            object.__setattr__(self, "style", family(self.family).style)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden // self.heads  # as the importer sets megatron's kv_channels

    @classmethod
    def from_hf_config(cls, cfg: Mapping | str | Path) -> "ModelShape":
        """From config.json's contents (a mapping) or a model directory / config.json path; a
        ValueError for a family without a megatron layout."""
        from ptuning_dist.backbone.families import family, megatron_families

        if not isinstance(cfg, Mapping):
            path = Path(cfg)
            cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        fam = family(cfg.get("model_type"), need=None)
        if fam is None or fam.style is None:
            raise ValueError(f"no memory model for model_type {cfg.get('model_type')!r} "
                             f"({', '.join(sorted(megatron_families()))})")
        return fam.shape(cfg)

    def hf_num_params(self) -> int:
        """The Hugging Face model's parameter count (tied tables counted once)."""
        from ptuning_dist.planning.memory import full_depth_numel

        return full_depth_numel(self, tp=1)

    def padded_vocab(self, tp: int) -> int:
        return padded_vocab(self.vocab, tp)
