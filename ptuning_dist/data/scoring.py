"""Answers of several tokens: every candidate scored by its tokens' log-probabilities (teacher forcing).

COPA's choices, ReCoRD's entities, a verbalizer word the tokenizer splits: an example with K
candidate answers becomes K sequences, ``context + candidate[:-1]``, all in the same forward; the
hidden state before each candidate token predicts that token::

    context  c0 c1 ... cL-1 | a0 a1 a2        candidate k = (a0, a1, a2, a3)
    scored   (L-1 -> a0) (L -> a1) (L+1 -> a2) (L+2 -> a3)
    score_k  = sum of log softmax(head(hidden))[token]      (data.candidate_score = mean: / 4)

and the loss is the cross-entropy of the example's K scores against its gold candidate (padded
candidates of an example with fewer than K score -inf). Everything here is on the host, in the
loader: the step reads ready-made index tensors and never syncs.

Shape suffixes: Q scored tokens of a forward (they are the backbone's "targets", ``target_*_E`` in
the Batch), X examples, K candidates per example (the batch's most).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sequence:
    """One sequence of a forward, duck-typed like ``Encoded`` for collate and packing."""

    ids: tuple[int, ...]
    prompt_pos: tuple[int, ...]
    prompt_slot: tuple[int, ...]
    targets: tuple[int, ...]  # positions whose hidden state is scored (one: the single-token target)
    tokens: tuple[int, ...] = ()  # the token each target position predicts (scoring only)


@dataclass
class Scoring:
    """Where each scored token's log-probability goes (all host lists, made tensors by collate)."""

    tokens_Q: list[int]
    seq_Q: list[int]  # x * K + k: the candidate it belongs to
    valid_XK: list[list[bool]]
    length_XK: list[list[int]]
    label_X: list[int]


def sequences(examples) -> tuple[list[Sequence], Scoring | None]:
    """The forward's sequences: one per example (a single-token target), or, when the examples
    carry candidate answers, one per (example, candidate) with its scored tokens."""
    if not any(e.cand_ids for e in examples):
        return [Sequence(e.enc.ids, e.enc.prompt_pos, e.enc.prompt_slot, (e.enc.target_pos,)) for e in examples], None
    assert all(e.cand_ids for e in examples), "a forward mixes single-token and candidate-scored examples"
    K = max(len(e.cand_ids) for e in examples)
    seqs, tokens, seq_of = [], [], []
    valid, length = [], []
    for x, e in enumerate(examples):
        L = len(e.enc.ids)
        for k, cand in enumerate(e.cand_ids):
            pos = tuple(range(L - 1, L - 1 + len(cand)))
            seqs.append(Sequence(e.enc.ids + tuple(cand[:-1]), e.enc.prompt_pos, e.enc.prompt_slot, pos, tuple(cand)))
            tokens.extend(cand)
            seq_of.extend([x * K + k] * len(cand))
        valid.append([k < len(e.cand_ids) for k in range(K)])
        length.append([len(e.cand_ids[k]) if k < len(e.cand_ids) else 1 for k in range(K)])
    return seqs, Scoring(tokens, seq_of, valid, length, [e.label for e in examples])


def longest(example) -> int:
    """Positions of the example's longest sequence (what a pipeline pads a step to)."""
    extra = max((len(c) for c in example.cand_ids), default=1) - 1 if example.cand_ids else 0
    return len(example.enc.ids) + extra
