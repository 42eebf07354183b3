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
from ptuning_dist.data.scoring import sequences
from ptuning_dist.data.tasks import Row, Task
from ptuning_dist.errors import DataError, TemplateError
from ptuning_dist.prompt.template import Encoded, Template


@dataclass
class Candidates:
    """The ids the head scores: a verbalizer's words, an allowed vocabulary, or (None) all."""

    ids: list[int] | None
    names: list[str] | None = None  # label names, for classification
    metric: str = "lama"  # Task.metric: lama (P@1), classification (accuracy, macro-F1), choice (accuracy),
    # multirc (F1a, EM), record (EM, F1)
    words: list[list[int]] | None = None  # a verbalizer of words of several tokens: scored (data/scoring.py)
    per_task: dict | None = None  # several tasks: name -> (its metric, label names or None, select_metric)
    scored: bool = False  # every row brings its own candidate answers (COPA, ReCoRD, several tasks, LAMA multi_token)

    @property
    def scoring(self) -> bool:
        """Whether rows are scored candidate by candidate (teacher forcing) rather than by one head."""
        return self.words is not None or self.scored

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
    if task.metric == "multitask":  # every row scores its own task's answers
        per_task = {n: (t.metric, list(t.verbalizer) if t.verbalizer else None, t.select_metric)
                    for n, t in task.tasks.items()}
        return Candidates(None, metric="multitask", per_task=per_task, scored=True)
    if getattr(task, "choices", False):  # each row brings its own candidate answers (COPA, ReCoRD, LAMA multi_token)
        return Candidates(None, metric=task.metric, scored=True)
    if task.verbalizer is not None:
        names, words = list(task.verbalizer), [tok.encode(w, space_before) for w in task.verbalizer.values()]
        for label, w in zip(names, words):
            if not w:
                raise TemplateError(f"verbalizer of task {task.name}: {label!r} -> {task.verbalizer[label]!r} has no tokens")
            if tok.unk_id is not None and tok.unk_id in w:
                raise TemplateError(f"verbalizer of task {task.name}: {label!r} -> {task.verbalizer[label]!r} is not in "
                                    "the tokenizer's vocabulary (it encodes as the unknown token)")
        if len({tuple(w) for w in words}) < len(words):
            raise TemplateError(f"verbalizer of task {task.name}: two labels have the same word {task.verbalizer}")
        if all(len(w) == 1 for w in words):  # the head scores K single tokens at the mask
            return Candidates([w[0] for w in words], names, metric=task.metric)
        # a word of several tokens: every label's word scored by its tokens' log-probabilities
        return Candidates(None, names, metric=task.metric, words=words)
    allowed_vocab = allowed_vocab or task.default_allowed_vocab
    if allowed_vocab == "full":
        return Candidates(None)
    if allowed_vocab == "objects":
        words = sorted({r.target for split in ("train", "dev", "test") for r in _rows_if_any(task, split)})
    else:
        path = Path(allowed_vocab)
        if not path.is_file():
            raise DataError(f"data.allowed_vocab: file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            words = json.loads(text) if text.lstrip().startswith("[") else text.split()
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"data.allowed_vocab {path}: not a UTF-8 word list or JSON list ({e})") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"data.allowed_vocab {path}: a JSON word list must be a list of strings")
    # words the tokenizer does not know (the unknown token) are no candidates
    ids = sorted({t for w in words if (t := tok.single_token(w, space_before)) is not None and t != tok.unk_id})
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
    row: Row | None = None  # the data row (metrics read its question id, answers, candidates)
    cand_ids: tuple[tuple[int, ...], ...] | None = None  # candidate answers' tokens (data/scoring.py); label
    # is then the gold candidate's index


def encode_rows(
    rows: list[Row], template_for: Callable[[Row], Template], tok, max_len: int, cands: Candidates,
    prompt_group_of: Callable[[Row], tuple[int, int]] = lambda row: (0, 0),
) -> list[Example]:
    """``prompt_group_of(row)`` -> (prompt group index, its first row in the stacked table)."""
    out = []
    for row in rows:
        template = template_for(row)
        g, offset = prompt_group_of(row)
        if cands.scoring:  # candidate answers scored token by token after the context
            words = cands.words if cands.words is not None else [
                tok.encode(c, template.parts[-1].space_before) for c in row.candidates]
            if any(not w for w in words):
                raise DataError(f"{row.where}: a candidate answer has no tokens: {row.candidates}")
            if tok.unk_id is not None and any(tok.unk_id in w for w in words):
                raise DataError(f"{row.where}: a candidate answer has a word the tokenizer does not know (the "
                                f"unknown token): {row.candidates if cands.words is None else cands.names}")
            label = cands.names.index(row.label) if cands.words is not None else row.candidates.index(row.target)
            enc = template.encode(row.values, None, tok, max_len, row.where, reserve=max(map(len, words)) - 1)
            cand_ids = tuple(tuple(w) for w in words)
        elif not row.labeled:  # a row to predict: no target to encode, a placeholder label
            enc = template.encode(row.values, None, tok, max_len, row.where)
            label, cand_ids = 0, None
        else:
            enc = template.encode(row.values, row.target, tok, max_len, row.where)
            label, cand_ids = cands.label_of(enc.target_id, row), None
        if offset:
            enc = dataclasses.replace(enc, prompt_slot=tuple(s + offset for s in enc.prompt_slot))
        out.append(Example(enc, label, row.group, g, row, cand_ids))
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
    ``pack_to``: pack instead, in rows of at most that many positions (``data/packing.py``).
    Examples with candidate answers become one sequence per candidate (``data/scoring.py``)."""
    seqs, scoring = sequences(examples)
    if pack_to is not None:
        assert seq_len is None, "a packed batch has no fixed sequence length"
        return with_scoring(pack(seqs, examples, pad_id, pack_to), scoring)
    S = max(len(q.ids) for q in seqs)
    if seq_len is not None:
        assert seq_len >= S, f"seq_len {seq_len} < the longest row {S}"
        S = seq_len
    B = len(seqs)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    rows, pos, slots, t_row, t_pos = [], [], [], [], []
    slot_map = torch.full((B, S), -1, dtype=torch.int32)
    for b, q in enumerate(seqs):
        L = len(q.ids)
        ids[b, :L] = torch.tensor(q.ids, dtype=torch.long)
        mask[b, :L] = 1
        slot_map[b, list(q.prompt_pos)] = torch.tensor(q.prompt_slot, dtype=torch.int32)
        rows.extend([b] * len(q.prompt_pos))
        pos.extend(q.prompt_pos)
        slots.extend(q.prompt_slot)
        t_row.extend([b] * len(q.targets))
        t_pos.extend(q.targets)
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return with_scoring(Batch(
        ids_BS=ids,
        attention_mask_BS=mask,
        prompt_rows_N=t(rows),
        prompt_pos_N=t(pos),
        prompt_slots_N=t(slots),
        slot_BS=slot_map,
        target_pos_E=t(t_pos),
        label_E=t([e.label for e in examples]),
        n_tokens=int(mask.sum()),
        groups=[e.group for e in examples],
        target_row_E=t(t_row),
    ), scoring)


def with_scoring(batch: Batch, scoring) -> Batch:
    """Attach the candidate-scoring tensors (``data/scoring.py``) to a batch, if any."""
    if scoring is not None:
        batch.score_tokens_Q = torch.tensor(scoring.tokens_Q, dtype=torch.long)
        batch.score_seq_Q = torch.tensor(scoring.seq_Q, dtype=torch.long)
        batch.cand_valid_XK = torch.tensor(scoring.valid_XK, dtype=torch.bool)
        batch.cand_len_XK = torch.tensor(scoring.length_XK, dtype=torch.float32)
    return batch
