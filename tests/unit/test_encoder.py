"""Prompt encoders against the paper's architecture and parameter count."""
from __future__ import annotations

import pytest
import torch

from ptuning_dist.errors import ConfigError
from ptuning_dist.prompt.encoder import PromptEncoder, PromptTable, num_params


def paper_lstm_params(m: int, h: int) -> int:
    """Written out independently: embedding m x h; biLSTM, 2 layers, h/2 units per direction
    (each gate block 4 x h/2, inputs h for both layers since 2 x h/2 = h, two bias vectors);
    MLP Linear(h, h) -> ReLU -> Linear(h, h)."""
    u = h // 2
    per_direction_layer = 4 * u * h + 4 * u * u + 4 * u + 4 * u
    return m * h + 2 * 2 * per_direction_layer + (h * h + h) * 2


@pytest.mark.parametrize("m,h", [(6, 64), (3, 128), (20, 32)])
def test_lstm_is_the_papers(m, h):
    enc = PromptEncoder("lstm", m, h)
    assert enc.lstm.num_layers == 2 and enc.lstm.bidirectional and enc.lstm.hidden_size == h // 2
    assert [type(x).__name__ for x in enc.mlp] == ["Linear", "ReLU", "Linear"]
    n = sum(p.numel() for p in enc.parameters())
    assert n == paper_lstm_params(m, h) == num_params("lstm", m, h)  # num_params: on the meta device
    assert enc().shape == (m, h) and enc().dtype == torch.float32


@pytest.mark.parametrize("kind,extra", [("mlp", lambda h: 2 * (h * h + h)), ("embedding", lambda h: 0)])
def test_other_variants(kind, extra):
    enc = PromptEncoder(kind, 5, 16)
    assert sum(p.numel() for p in enc.parameters()) == 5 * 16 + extra(16) == num_params(kind, 5, 16)
    assert enc().shape == (5, 16)
    if kind == "embedding":
        assert torch.equal(enc(), enc.embedding.weight)


def test_same_seed_same_table_and_export():
    torch.manual_seed(3)
    a = PromptEncoder("lstm", 4, 32, lstm_dropout=0.5)
    torch.manual_seed(3)
    b = PromptEncoder("lstm", 4, 32, lstm_dropout=0.5)
    assert torch.equal(a.export_table(), b.export_table())
    a.train()
    table = a.export_table()  # dropout off in the export, training mode restored
    assert a.training and not table.requires_grad
    a.eval()
    with torch.no_grad():
        assert torch.equal(table, a())
    # with grad enabled torch's LSTM takes another kernel path: equal within rounding only
    torch.testing.assert_close(table, a().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(PromptTable(table)(), table, rtol=0, atol=0)
    assert PromptTable(table).n_prompt == 4


def test_output_does_not_depend_on_any_input():
    enc = PromptEncoder("lstm", 3, 16)
    assert torch.equal(enc(), enc())  # deterministic in eval and train without dropout


def test_bad_encoder_configs():
    with pytest.raises(ConfigError, match="prompt.encoder: 'gru'"):
        PromptEncoder("gru", 3, 16)
    with pytest.raises(ConfigError, match="even hidden size"):
        PromptEncoder("lstm", 3, 15)
    with pytest.raises(ConfigError, match="at least one prompt slot"):
        PromptEncoder("lstm", 0, 16)
