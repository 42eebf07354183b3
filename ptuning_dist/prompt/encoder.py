"""Prompt encoders: m prompt slots -> a table of m continuous embeddings (m x h).

The paper's encoder ("GPT Understands, Too", section 3.2) is ``lstm``: an embedding of the m
slots, a 2-layer bidirectional LSTM with h/2 hidden units per direction (so its output is h wide),
then a 2-layer ReLU MLP, Linear(h, h) -> ReLU -> Linear(h, h). ``mlp`` drops the LSTM and
``embedding`` is a plain trainable table (prompt tuning / "P-tuning without reparametrisation").

The output depends on nothing but the parameters, so it is computed ONCE per step and broadcast
to every row by the splice; it stays in fp32 whatever dtype the backbone runs in. After training
the encoder is dropped: ``export_table()`` gives the m x h table that serves inference through
``PromptTable``.
"""
from __future__ import annotations

import torch
from torch import nn

from ptuning_dist.errors import ConfigError

ENCODERS = ("lstm", "mlp", "embedding")


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
        if kind == "lstm":
            self.lstm = nn.LSTM(
                input_size=hidden,
                hidden_size=hidden // 2,
                num_layers=2,
                dropout=lstm_dropout,
                bidirectional=True,
                batch_first=True,
            )
        if kind in ("lstm", "mlp"):
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

    @staticmethod
    def expected_num_params(kind: str, n_prompt: int, hidden: int) -> int:
        """Parameter count by the paper's formula (used by tests and the trainable-count check)."""
        h, half = hidden, hidden // 2
        total = n_prompt * h
        if kind == "lstm":
            # per layer and direction: W_ih (4*half x in), W_hh (4*half x half), two biases 4*half
            per_dir = lambda inp: 4 * half * inp + 4 * half * half + 2 * 4 * half  # noqa: E731
            total += 2 * per_dir(h) + 2 * per_dir(2 * half)
        if kind in ("lstm", "mlp"):
            total += 2 * (h * h + h)
        return total


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
