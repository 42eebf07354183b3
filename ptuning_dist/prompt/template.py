"""The template language: prompt slots, input fields and anchor words, turned into token ids.

A template is a string such as::

    "[P*3] {sub_label} [P*3]"                                   (LAMA on a GPT)
    "{premise} Question: {hypothesis} ? [P*3] Answer: [MASK] ."   (RTE, with a verbalizer)

- ``[P]`` is one prompt slot, ``[P*n]`` is n slots. Slots are numbered 0..m-1 left to right; the
  prompt encoder produces one row of the table per slot.
- ``{name}`` is an input field of the data row (dotted names reach nested JSON: ``{target.span1_text}``).
- ``[MASK]`` is the target. A causal LM predicts it from the hidden state of the position just
  before it, so everything after ``[MASK]`` is invisible to the model and is dropped. A template
  without ``[MASK]`` predicts the next token after its last part.
- Anything else is literal anchor text ("capital", "?", "Answer:").

Token ids are built piece by piece (never by a string round-trip through added special tokens).
Prompt positions carry the pad id as a placeholder: they are never looked up in the vocabulary,
the splice overwrites them. Truncation cuts the longest input field, never a prompt slot, an
anchor or the target.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ptuning_dist.errors import TemplateError

_TOKEN_RE = re.compile(r"\[P(?:\*(\d+))?\]|\{([^{}\s]*)\}|\[MASK\]")
_FIELD_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


@dataclass(frozen=True)
class Part:
    """One piece of a template. ``kind`` is 'prompt', 'field', 'text' or 'mask'."""

    kind: str
    value: str = ""  # field name or literal text
    count: int = 0  # number of slots (prompt parts)
    first_slot: int = 0  # slot number of this part's first slot (prompt parts)
    space_before: bool = False  # whitespace precedes this part in the template


@dataclass(frozen=True)
class Encoded:
    """One row after templating: token ids up to (not including) the target, and its plan.

    ``prompt_pos``/``prompt_slot`` list every prompt position with its slot number; the collator
    turns them into the batch's flat plan, so the step never searches for prompt tokens.
    """

    ids: tuple[int, ...]
    prompt_pos: tuple[int, ...]
    prompt_slot: tuple[int, ...]
    target_id: int  # vocabulary id of the target token
    truncated: int = 0  # tokens cut from input fields

    @property
    def target_pos(self) -> int:
        """Position whose hidden state predicts the target (causal LM: the last one)."""
        return len(self.ids) - 1


def parse(template: str) -> list[Part]:
    """Parse a template string into parts, with clear errors naming the template."""
    if not isinstance(template, str) or not template.strip():
        raise TemplateError(f"template {template!r}: empty template")
    parts: list[Part] = []
    slot = 0
    pos = 0

    def add_text(chunk: str, start: int) -> None:
        for m in re.finditer(r"\S+(?:\s+\S+)*", chunk):
            if "[" in m.group() or "]" in m.group() or "{" in m.group() or "}" in m.group():
                bad = m.group()
                raise TemplateError(
                    f"template {template!r}: cannot parse {bad!r}; use [P], [P*n], {{field}} or [MASK]"
                )
            space = (start + m.start()) > 0 and template[start + m.start() - 1].isspace()
            parts.append(Part("text", value=m.group(), space_before=space))

    for m in _TOKEN_RE.finditer(template):
        add_text(template[pos : m.start()], pos)
        space = m.start() > 0 and template[m.start() - 1].isspace()
        tok = m.group()
        if tok == "[MASK]":
            parts.append(Part("mask", space_before=space))
        elif tok.startswith("[P"):
            count = int(m.group(1)) if m.group(1) is not None else 1
            if count < 1:
                raise TemplateError(f"template {template!r}: {tok} must hold at least one slot")
            parts.append(Part("prompt", count=count, first_slot=slot, space_before=space))
            slot += count
        else:
            name = m.group(2)
            if not _FIELD_RE.match(name):
                raise TemplateError(f"template {template!r}: bad field name {{{name}}}")
            parts.append(Part("field", value=name, space_before=space))
        pos = m.end()
    add_text(template[pos:], pos)

    masks = sum(p.kind == "mask" for p in parts)
    if masks > 1:
        raise TemplateError(f"template {template!r}: {masks} [MASK] targets, expected one")
    if masks == 0:
        parts.append(Part("mask", space_before=True))
    # A causal LM cannot see past the target: drop what follows [MASK].
    cut = next(i for i, p in enumerate(parts) if p.kind == "mask")
    parts = parts[: cut + 1]
    if cut == 0:
        raise TemplateError(f"template {template!r}: nothing precedes the target [MASK]")
    return parts


class Template:
    """A parsed template bound to a tokenizer (``PieceTokenizer``)."""

    def __init__(self, text: str, fields: tuple[str, ...] | None = None):
        self.text = text
        self.parts = parse(text)
        self.n_prompt = sum(p.count for p in self.parts if p.kind == "prompt")
        self.fields = tuple(p.value for p in self.parts if p.kind == "field")
        if fields is not None:
            unknown = [f for f in self.fields if f not in fields]
            if unknown:
                raise TemplateError(
                    f"template {text!r}: unknown field(s) {unknown}; this task has {list(fields)}"
                )

    def __repr__(self) -> str:
        return f"Template({self.text!r}, n_prompt={self.n_prompt})"

    def without_prompts(self) -> "Template":
        """The same template with every prompt slot removed (the manual baseline)."""
        text = _TOKEN_RE.sub(lambda m: "" if m.group().startswith("[P") else m.group(), self.text)
        return Template(" ".join(text.split()))

    def encode(self, values: dict[str, str], target: str | None, tok, max_len: int, where: str,
               reserve: int = 0) -> Encoded:
        """Token ids and prompt plan for one row.

        ``values`` maps field names to text, ``target`` is the target word, ``where`` names the
        row (``file:line``) for errors. Raises ``TemplateError`` naming the row when the target
        is not a single vocabulary token or the fixed parts alone exceed ``max_len``.
        ``target`` None: the row's answers are scored as candidate continuations
        (``data/scoring.py``; ``target_id`` -1), and ``reserve`` positions are kept free for the
        longest candidate's tokens after the context.
        """
        pieces: list[list[int]] = []
        for p in self.parts[:-1]:
            if p.kind == "prompt":
                pieces.append([tok.pad_id] * p.count)
            elif p.kind == "text":
                pieces.append(tok.encode(p.value, p.space_before))
            else:
                if p.value not in values:
                    raise TemplateError(f"{where}: row has no field {p.value!r} used by template {self.text!r}")
                pieces.append(tok.encode(str(values[p.value]), p.space_before))
        mask = self.parts[-1]
        target_ids = tok.encode(str(target), mask.space_before) if target is not None else [-1]
        if len(target_ids) != 1:
            raise TemplateError(
                f"{where}: target {target!r} is {len(target_ids)} tokens {target_ids}, "
                "must be a single vocabulary token"
            )
        unk = getattr(tok, "unk_id", None)
        if target is not None and unk is not None and target_ids[0] == unk:
            raise TemplateError(f"{where}: target {target!r} is not in the tokenizer's vocabulary (it encodes as "
                                "the unknown token, which would be trained as the answer)")
        prefix = [tok.bos_id] if tok.bos_id is not None else []
        truncated = _truncate(pieces, self.parts[:-1], max_len - len(prefix) - reserve, self.text, where)
        ids, prompt_pos, prompt_slot = list(prefix), [], []
        for p, piece in zip(self.parts[:-1], pieces):
            if p.kind == "prompt":
                prompt_pos.extend(range(len(ids), len(ids) + p.count))
                prompt_slot.extend(range(p.first_slot, p.first_slot + p.count))
            ids.extend(piece)
        return Encoded(tuple(ids), tuple(prompt_pos), tuple(prompt_slot), target_ids[0], truncated)


def _truncate(pieces: list[list[int]], parts: list[Part], budget: int, text: str, where: str) -> int:
    """Cut tokens from the end of the longest field until the pieces fit ``budget``."""
    over = sum(map(len, pieces)) - budget
    if over <= 0:
        return 0
    field_idx = [i for i, p in enumerate(parts) if p.kind == "field"]
    fixed = sum(len(pieces[i]) for i in range(len(pieces)) if i not in field_idx)
    if fixed + len(field_idx) > budget:  # keep at least one token of each field
        raise TemplateError(
            f"{where}: template {text!r} needs {fixed} fixed tokens plus its fields, "
            f"more than max_seq_len allows ({budget})"
        )
    cut = over
    while over > 0:
        i = max(field_idx, key=lambda j: len(pieces[j]))
        second = max((len(pieces[j]) for j in field_idx if j != i), default=1)
        n = min(over, max(1, len(pieces[i]) - max(second, 1)))
        del pieces[i][len(pieces[i]) - n :]
        over -= n
    return cut
