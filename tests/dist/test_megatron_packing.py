"""Packed forwards on the megatron backend (one copy of the shared prompt prefix per packed row,
no padding; data/packing.py) against padded ones: the same losses, prompt-encoder gradients and
predictions at TP=1, TP=2 and PP=2, for GPT-2 (learned positions written per token by the fused
splice) and LLaMA (RoPE rotated by each token's own position, GQA, untied head)."""
from __future__ import annotations

import sys

import pytest
import torch
from distutil import COMMON, WORKER, losses, record, run, torchrun

WIC = ["--task", "wic", "--max_seq_len", 96, "--test_split", "dev"]
LAYOUTS = {"tp1": [], "tp2": ["--tp", 2], "pp2": ["--pp", 2]}


def train(out, model, layout, packing, task):
    args = ["--record", out / "rec", "--model", model, "--output_dir", out, "--backend", "megatron",
            *LAYOUTS[layout], "--packing", packing, *task, *COMMON]
    if layout == "tp1":
        run([sys.executable, WORKER, *args])
    else:
        torchrun(2, WORKER, *args)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_equals_padded_on_megatron(backbone, family_dirs, tmp_path, family, layout):
    # short rows, several per packed row, so positions restart inside a row (learned positions and
    # RoPE per token): LAMA for GPT-2; WiC (two short sentences and a word) for LLaMA, whose
    # sentencepiece tokenizer splits LAMA's objects into several tokens
    model, task = (backbone, []) if family == "gpt2" else (family_dirs["llama"], WIC)
    packed = train(tmp_path / "packed", model, layout, "on", task)
    padded = train(tmp_path / "padded", model, layout, "off", task)
    a, b = losses(packed), losses(padded)
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    on, off = record(packed, 0), record(padded, 0)  # rank 0: stage 0, where the encoder lives
    assert all(on["packed"].values()) and not any(off["packed"].values())
    # the shared prefix once per packed row, no padding: fewer positions; under PP every forward is
    # padded to the step's largest (one activation shape), which can give back what packing saved
    # on short rows (seen: 100 -> 112 positions, the padded count), never more
    saved = sum(on["positions"].values()), sum(off["positions"].values())
    assert saved[0] <= saved[1] if layout == "pp2" else saved[0] < saved[1], saved
    assert on["max_rows_per_bin"] > 1  # rows really share packed rows: positions restart inside one
    for step in (1, 3):
        assert on["grads"][step].keys() == off["grads"][step].keys()
        for name, g in off["grads"][step].items():
            torch.testing.assert_close(on["grads"][step][name], g, atol=1e-6, rtol=1e-4, msg=f"{step} {name}")
    # every evaluation (dev and test splits, the prompt table and the manual baseline): the same argmax
    assert on["predictions"] and on["predictions"] == off["predictions"]
