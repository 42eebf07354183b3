"""From task rows to batches: candidates, encoded examples, a deterministic sample stream, padding.

Everything here runs on the CPU in the data loader, so the training step gets the prompt plan
(flat row/position/slot triplets) and the target positions ready-made and never syncs the host.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ptuning_dist.data.batch import Batch
from ptuning_dist.data.packing import pack
from ptuning_dist.data.tasks import Row, Task
from ptuning_dist.errors import DataError, TemplateError
from ptuning_dist.prompt.template import Encoded, Template


@dataclass
class Candidates:
    """The ids the head scores: a verbalizer's words, an allowed vocabulary, or (None) all."""

    ids: list[int] | None
    names: list[str] | None = None  # label names, for classification

    def __post_init__(self):
        self.index = {v: k for k, v in enumerate(self.ids)} if self.ids is not None else None

    def label_of(self, target_id: int, row: Row) -> int:
        if self.index is None:
            return target_id
        if target_id not in self.index:
            raise TemplateError(f"{row.where}: target {row.target!r} is not in the allowed vocabulary")
        return self.index[target_id]

    def tensor(self) -> torch.Tensor | None:
        return None if self.ids is None else torch.tensor(self.ids, dtype=torch.long)


def build_candidates(task: Task, tok, allowed_vocab: str | None, space_before: bool = True) -> Candidates:
    """Verbalizer ids for classification; for LAMA ``allowed_vocab`` is ``"full"`` (the whole
    vocabulary), None (the task's default), ``"objects"`` (every object of the task's data) or a file of words (a JSON list
    or one word a line, as the paper's LAMA-29k/34k vocabularies); words that are not single
    tokens of this tokenizer are left out of a file vocabulary."""
    if task.verbalizer is not None:
        ids, names = [], []
        for label, word in task.verbalizer.items():
            tid = tok.single_token(word, space_before)
            if tid is None:
                raise TemplateError(f"verbalizer of task {task.name}: {label!r} -> {word!r} is not a single token")
            if tid in ids:
                raise TemplateError(f"verbalizer of task {task.name}: {word!r} maps two labels to one token")
            ids.append(tid)
            names.append(label)
        return Candidates(ids, names)
    allowed_vocab = allowed_vocab or task.default_allowed_vocab
    if allowed_vocab == "full":
        return Candidates(None)
    if allowed_vocab == "objects":
        words = sorted({r.target for split in ("train", "dev", "test") for r in _rows_if_any(task, split)})
    else:
        path = Path(allowed_vocab)
        if not path.is_file():
            raise DataError(f"data.allowed_vocab: file not found: {path}")
        text = path.read_text(encoding="utf-8")
        words = json.loads(text) if text.lstrip().startswith("[") else text.split()
    ids = sorted({t for w in words if (t := tok.single_token(w, space_before)) is not None})
    if not ids:
        raise DataError(f"data.allowed_vocab {allowed_vocab!r}: no word is a single token of this tokenizer")
    return Candidates(ids)


def _rows_if_any(task: Task, split: str) -> list[Row]:
    try:
        return task.rows(split)
    except DataError:
        return []


@dataclass(frozen=True)
class Example:
    enc: Encoded  # prompt_slot already offset to the row's group's rows of the stacked table
    label: int  # index into the candidates (or the vocabulary id when all ids are scored)
    group: str  # the row's group (LAMA relation / task): metrics are per group
    pgroup: int = 0  # index of its prompt group (prompt/groups.py): which encoder its slots train


def encode_rows(
    rows: list[Row], template_for: Callable[[Row], Template], tok, max_len: int, cands: Candidates,
    prompt_group_of: Callable[[Row], tuple[int, int]] = lambda row: (0, 0),
) -> list[Example]:
    """``prompt_group_of(row)`` -> (prompt group index, its first row in the stacked table)."""
    out = []
    for row in rows:
        enc = template_for(row).encode(row.values, row.target, tok, max_len, row.where)
        g, offset = prompt_group_of(row)
        if offset:
            enc = dataclasses.replace(enc, prompt_slot=tuple(s + offset for s in enc.prompt_slot))
        out.append(Example(enc, cands.label_of(enc.target_id, row), row.group, g))
    if not out:
        raise DataError("no examples: the data split is empty")
    return out


class SampleStream:
    """An endless, deterministic stream of example indices: epoch e is a permutation drawn from
    (seed, e). Batches run on across epoch ends so every step sees exactly ``batch`` samples.
    The position (samples consumed) is all that is needed to resume the stream."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.consumed = 0
        self._epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
            self._epoch = epoch
        return self._perm

    def take(self, batch: int) -> list[int]:
        out = []
        for s in range(self.consumed, self.consumed + batch):
            out.append(self._perm_of(s // self.n)[s % self.n])
        self.consumed += batch
        return out

    def state(self) -> dict:
        return {"consumed": self.consumed}

    def load_state(self, state: dict) -> None:
        self.consumed = state["consumed"]


def collate(examples: list[Example], pad_id: int, seq_len: int | None = None, pack_to: int | None = None) -> Batch:
    """Right-pad to the longest row of this batch (dynamic padding), or to ``seq_len`` (a
    pipeline's micro-batches share one activation shape per step), and flatten the plan.
    ``pack_to``: pack instead, in rows of at most that many positions (``data/packing.py``)."""
    if pack_to is not None:
        assert seq_len is None, "a packed batch has no fixed sequence length"
        return pack(examples, pad_id, pack_to)
    S = max(len(e.enc.ids) for e in examples)
    if seq_len is not None:
        assert seq_len >= S, f"seq_len {seq_len} < the longest row {S}"
        S = seq_len
    B = len(examples)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    rows, pos, slots = [], [], []
    slot_map = torch.full((B, S), -1, dtype=torch.int32)
    for b, e in enumerate(examples):
        L = len(e.enc.ids)
        ids[b, :L] = torch.tensor(e.enc.ids, dtype=torch.long)
        mask[b, :L] = 1
        slot_map[b, list(e.enc.prompt_pos)] = torch.tensor(e.enc.prompt_slot, dtype=torch.int32)
        rows.extend([b] * len(e.enc.prompt_pos))
        pos.extend(e.enc.prompt_pos)
        slots.extend(e.enc.prompt_slot)
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Batch(
        ids_BS=ids,
        attention_mask_BS=mask,
        prompt_rows_N=t(rows),
        prompt_pos_N=t(pos),
        prompt_slots_N=t(slots),
        slot_BS=slot_map,
        target_pos_E=t([e.enc.target_pos for e in examples]),
        label_E=t([e.label for e in examples]),
        n_tokens=int(mask.sum()),
        groups=[e.group for e in examples],
        target_row_E=torch.arange(B),
    )
