"""Prompt encoders: m prompt slots -> a table of m continuous embeddings (m x h).

The paper's encoder ("GPT Understands, Too", section 3.2) is ``lstm``: an embedding of the m
slots, a 2-layer bidirectional LSTM with h/2 hidden units per direction (so its output is h wide),
then a 2-layer ReLU MLP, Linear(h, h) -> ReLU -> Linear(h, h). ``mlp`` drops the LSTM and
``embedding`` is a plain trainable table (prompt tuning / "P-tuning without reparametrisation").

The output depends on nothing but the parameters, so it is computed ONCE per step and broadcast
to every row by the splice; it stays in fp32 whatever dtype the backbone runs in. After training
the encoder is dropped: ``export_table()`` gives the m x h table that serves inference through
``PromptTable``.

The kinds are ``config.EncoderKind``; a kind is its layers after the slot embedding (``LAYERS``).
Parameter counts come from the module itself (``num_params``: built on the meta device), for the
trainer's trainable-parameter check and the planner alike.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ptuning_dist.config import EncoderKind, choices
from ptuning_dist.errors import ConfigError

ENCODERS = choices(EncoderKind)
LAYERS = {"lstm": ("lstm", "mlp"), "mlp": ("mlp",), "embedding": ()}  # after the embedding of the slots
assert tuple(LAYERS) == ENCODERS, "every config.EncoderKind needs its layers here"


class PromptEncoder(nn.Module):
    """``forward()`` -> table_MH (fp32). Every variant starts from an embedding of the slots."""

    def __init__(self, kind: str, n_prompt: int, hidden: int, lstm_dropout: float = 0.0):
        super().__init__()
        if kind not in ENCODERS:
            raise ConfigError(f"prompt.encoder: {kind!r} is not one of {ENCODERS}")
        if n_prompt < 1:
            raise ConfigError(f"prompt encoder needs at least one prompt slot, the template has {n_prompt}")
        if kind == "lstm" and hidden % 2:
            raise ConfigError(f"prompt.encoder 'lstm' needs an even hidden size, got {hidden}")
        self.kind, self.n_prompt, self.hidden = kind, n_prompt, hidden
        self.embedding = nn.Embedding(n_prompt, hidden)
        self.lstm = None
        self.mlp = None
        if "lstm" in LAYERS[kind]:
            self.lstm = nn.LSTM(
                input_size=hidden,
                hidden_size=hidden // 2,
                num_layers=2,
                dropout=lstm_dropout,
                bidirectional=True,
                batch_first=True,
            )
        if "mlp" in LAYERS[kind]:
            self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.float()

    def forward(self) -> torch.Tensor:
        table_MH = self.embedding.weight
        if self.lstm is not None:
            table_MH = self.lstm(table_MH.unsqueeze(0))[0].squeeze(0)  # (1, M, H) -> (M, H)
        if self.mlp is not None:
            table_MH = self.mlp(table_MH)
        return table_MH

    @torch.no_grad()
    def export_table(self) -> torch.Tensor:
        """The m x h table this encoder produces now (fp32, detached, on CPU)."""
        was_training = self.training
        self.eval()  # no LSTM dropout in the exported table
        table_MH = self.forward().detach().float().cpu().clone()
        self.train(was_training)
        return table_MH


@functools.cache
def num_params(kind: str, n_prompt: int, hidden: int) -> int:
    """Parameters of a ``kind`` encoder of ``n_prompt`` slots and width ``hidden``, counted on a
    meta-device instance (no memory, milliseconds even at 530B's width)."""
    with torch.device("meta"):
        return sum(p.numel() for p in PromptEncoder(kind, n_prompt, hidden).parameters())


class PromptTable(nn.Module):
    """An exported table standing in for the encoder at inference: ``forward()`` -> table_MH."""

    def __init__(self, table_MH: torch.Tensor):
        super().__init__()
        self.register_buffer("table_MH", table_MH.detach().float().clone())
        self.n_prompt, self.hidden = table_MH.shape

    def forward(self) -> torch.Tensor:
        return self.table_MH

    def export_table(self) -> torch.Tensor:
        return self.table_MH.cpu().clone()
