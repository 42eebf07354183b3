"""Prompt-table export: round trip, sidecar, refusals, atomic writes."""
from __future__ import annotations

import json

import pytest
import torch

from ptuning_dist.errors import CheckpointError
from ptuning_dist.prompt.encoder import PromptEncoder
from ptuning_dist.prompt.export import load_encoder, load_table, save_encoder, save_table


IDENT = {"path": "/m", "fingerprint": "abc" * 10, "tokenizer": "tok" * 10}


def save(tmp_path, table):
    return save_table(tmp_path / "t", table, template="[P*2] {x} [MASK]", ident=IDENT,
                      tokenizer="/m", vocab_size=99, extra={"task": "rte"})


def test_round_trip_and_sidecar(tmp_path):
    table = torch.randn(2, 8)
    d = save(tmp_path, table)
    got, meta = load_table(d, ident=IDENT)
    assert torch.equal(got, table)
    assert meta["n_prompt"] == 2 and meta["hidden_size"] == 8 and meta["dtype"] == "float32"
    assert meta["template"] == "[P*2] {x} [MASK]" and meta["vocab_size"] == 99 and meta["task"] == "rte"
    assert meta["backbone"] == IDENT
    assert sorted(p.name for p in d.iterdir()) == ["prompt_table.json", "prompt_table.safetensors"]  # no .tmp


def test_refusals(tmp_path):
    d = save(tmp_path, torch.randn(2, 8))
    with pytest.raises(CheckpointError, match="was trained on backbone /m"):
        load_table(d, ident={**IDENT, "fingerprint": "other"})
    with pytest.raises(CheckpointError, match="tokenizer of /m"):
        load_table(d, ident={**IDENT, "path": "/n", "tokenizer": "other"})
    meta = json.loads((d / "prompt_table.json").read_text())
    (d / "prompt_table.json").write_text(json.dumps({**meta, "n_prompt": 3}))
    with pytest.raises(CheckpointError, match=r"shape \(2, 8\) != \(3, 8\)"):
        load_table(d)
    f = d / "prompt_table.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_table(d)
    f.unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_table(d)


def test_encoder_weights_round_trip_and_mismatch(tmp_path):
    a, b = PromptEncoder("lstm", 3, 16), PromptEncoder("lstm", 3, 16)
    save_encoder(tmp_path / "e.safetensors", a)
    load_encoder(tmp_path / "e.safetensors", b)
    assert torch.equal(a.export_table(), b.export_table())
    with pytest.raises(CheckpointError, match="do not fit this encoder"):
        load_encoder(tmp_path / "e.safetensors", PromptEncoder("mlp", 3, 16))
    with pytest.raises(CheckpointError, match="other shape"):
        load_encoder(tmp_path / "e.safetensors", PromptEncoder("lstm", 4, 16))
