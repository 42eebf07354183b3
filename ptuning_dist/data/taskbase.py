"""What every task shares: the ``Row``, reading JSON lines with errors naming file and line, the
field helpers, and the ``Task`` interface (``tasks.py`` has the registry, ``superglue.py`` the
FewGLUE tasks)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ptuning_dist.errors import DataError


@dataclass(frozen=True)
class Row:
    values: dict  # field name -> text
    target: str  # the target word (LAMA object, or the verbalized label)
    label: str  # the gold label as the data says it (class name or object)
    group: str  # LAMA relation id, or the task name: metrics are reported per group
    where: str  # "file:line", for errors
    candidates: tuple[str, ...] | None = None  # answers scored token by token (COPA); target is one of them
    labeled: bool = True  # False: a row to predict (ptuning-predict); target and label are placeholders


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; errors name the file and line."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    out = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            out.append((n, obj))
    if not out:
        raise DataError(f"{path}: no rows (the file is blank)")
    return out


def _get(obj: dict, dotted: str, where: str):
    cur = obj
    for key in dotted.split("."):
        if not isinstance(cur, dict) or key not in cur:
            raise DataError(f"{where}: row has no field {dotted!r}")
        cur = cur[key]
    return cur


def _label_str(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _text(value, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _answer(value, field: str, where: str) -> str:
    """PET's form of an answer sentence: first letter lowercased, final punctuation dropped."""
    text = _text(value, field, where).rstrip(".!?")
    return text[:1].lower() + text[1:]


class Task:
    name: str
    fields: tuple[str, ...]
    default_template: str
    verbalizer: dict[str, str] | None = None  # label -> target word (classification)
    default_allowed_vocab: str = "full"  # LAMA: which ids the head scores when the config says None
    splits: dict[str, str]  # split name -> file name
    select_metric: str = "accuracy"  # what best-on-dev selection compares (LAMA: P@1 of the group)
    metric: str = "classification"  # the metrics (train/evaluate.py): lama, classification, choice, multirc, record

    def __init__(self, data_dir: str | Path | None):
        self.data_dir = Path(data_dir) if data_dir else self.default_dir()

    def default_dir(self) -> Path:
        raise DataError(f"task {self.name!r} needs data.data_dir (--data_dir)")

    def rows(self, split: str) -> list[Row]:
        raise NotImplementedError

    def read(self, path: Path, labeled: bool = True) -> list[Row]:
        """Rows of any JSONL file of this task's fields; ``labeled`` False: the label may be absent
        (rows to predict)."""
        return [r for n, obj in read_jsonl(path) for r in self.row_of(obj, f"{path}:{n}", labeled)]

    def row_of(self, obj: dict, where: str, labeled: bool = True, group: str | None = None) -> list[Row]:
        """The rows of one JSON object (MultiRC: one per answer option)."""
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        """Whether the data has this split (a split some relations have and others lack is an error)."""
        raise NotImplementedError

    def template_of(self, group: str) -> str:
        """The default template of a group's rows (several tasks: each its own)."""
        return self.default_template

    def fields_of(self, group: str) -> tuple[str, ...]:
        return self.fields

    def groups(self) -> list[str]:
        """The groups rows belong to (``Row.group``), in a fixed order: one prompt each under
        prompt.sharing = per_group."""
        return [self.name]

    def manual_template(self, group: str) -> str:
        """The hand-written template of the manual baseline (no prompt slots)."""
        raise NotImplementedError
