"""Tasks: where rows come from, which fields they have, and what the target is.

- ``lama``: LAMA-style knowledge probing, the layout of the P-tuning code's fact-retrieval data:
  ``<data_dir>/relations.jsonl`` (one relation a line: ``relation``, a manual ``template`` such as
  ``"The capital of [X] is [Y] ."``, ``label``) and ``<data_dir>/<relation>/<split>.jsonl``
  (``sub_label``, ``obj_label``, ``predicate_id``). The target is ``obj_label``.
- the eight FewGLUE tasks (``superglue.py``), alone or several in one run (``MultiTask``).
- ``default``: the embedded knowledge LM's probe when the model carries one, else the bundled tiny
  LAMA set (two relations, 40 facts) the fast tests train on.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ptuning_dist.config import TaskName, choices
from ptuning_dist.data.superglue import (BoolqTask, CbTask, CopaTask, MultircTask, RecordTask, RteTask,  # noqa: F401
                                         SuperGlueTask, WicTask, WscTask)
from ptuning_dist.data.taskbase import Row, Task, _get, _text, read_jsonl  # noqa: F401 - the tasks' one import point
from ptuning_dist.errors import DataError

BUNDLED_LAMA = Path(__file__).parent / "bundled" / "lama_tiny"


class LamaTask(Task):
    name = "lama"
    metric = "lama"
    fields = ("sub_label",)
    default_template = "[P*3] {sub_label} [P*3]"

    def __init__(self, data_dir=None, relations: list[str] | None = None, multi_token: bool = False):
        super().__init__(data_dir)
        self.choices = multi_token  # score each relation's objects token by token (data.multi_token)
        self._objects: dict[str, tuple[str, ...]] = {}
        rel_file = self.data_dir / "relations.jsonl"
        self.templates = {}
        for n, obj in read_jsonl(rel_file):
            for key in ("relation", "template"):
                if key not in obj:
                    raise DataError(f"{rel_file}:{n}: relation has no {key!r}")
            if "[X]" not in obj["template"] or "[Y]" not in obj["template"]:
                raise DataError(f"{rel_file}:{n}: template {obj['template']!r} needs [X] and [Y]")
            self.templates[obj["relation"]] = obj["template"]
        unknown = [r for r in relations or [] if r not in self.templates]
        if unknown:
            raise DataError(f"data.relations: {unknown} not in {rel_file} ({sorted(self.templates)})")
        self.relations = list(relations) if relations else sorted(self.templates)

    def rows(self, split: str) -> list[Row]:
        out = []
        for rel in self.relations:
            path = self.data_dir / rel / f"{split}.jsonl"
            out.extend(r for n, obj in read_jsonl(path) for r in self.row_of(obj, f"{path}:{n}", True, rel))
        return out

    def row_of(self, obj, where, labeled=True, group=None) -> list[Row]:
        """A fact; outside a relation's folder the row names its relation (``predicate_id``)."""
        rel = group or obj.get("predicate_id") or obj.get("relation")
        if rel not in self.relations:
            raise DataError(f"{where}: relation {rel!r} (predicate_id) is not one of {self.relations}")
        sub = _text(_get(obj, "sub_label", where), "sub_label", where)
        cands = self.objects(rel) if self.choices else None
        if labeled or "obj_label" in obj:
            obj_label = _get(obj, "obj_label", where)
            if not isinstance(obj_label, str) or not obj_label.strip():
                raise DataError(f"{where}: obj_label must be a non-empty string, got {obj_label!r}")
            if cands is not None and obj_label not in cands:
                raise DataError(f"{where}: obj_label {obj_label!r} is no object of relation {rel}'s files")
            return [Row({"sub_label": sub}, obj_label, obj_label, rel, where, cands)]
        return [Row({"sub_label": sub}, cands[0] if cands else "", "", rel, where, cands, labeled=False)]

    def objects(self, rel: str) -> tuple[str, ...]:
        """data.multi_token: the candidates of a relation's rows, every object its split files name."""
        if rel not in self._objects:
            found = set()
            for path in sorted((self.data_dir / rel).glob("*.jsonl")):
                found |= {o["obj_label"] for _, o in read_jsonl(path) if isinstance(o.get("obj_label"), str)}
            self._objects[rel] = tuple(sorted(found))
        return self._objects[rel]

    def groups(self) -> list[str]:
        return list(self.relations)

    def has_split(self, split: str) -> bool:
        have = [rel for rel in self.relations if (self.data_dir / rel / f"{split}.jsonl").is_file()]
        if have and len(have) != len(self.relations):
            missing = sorted(set(self.relations) - set(have))
            raise DataError(f"split {split!r}: {self.data_dir}/<relation>/{split}.jsonl is missing for {missing} "
                            f"(present for {len(have)} relations)")
        return bool(have)

    def manual_template(self, group: str) -> str:
        return self.templates[group].replace("[X]", "{sub_label}").replace("[Y]", "[MASK]")


class DefaultTask(LamaTask):
    """The bundled tiny LAMA set: the embedded default job needs no data on disk."""

    name = "default"
    default_allowed_vocab = "objects"

    def default_dir(self) -> Path:
        return BUNDLED_LAMA


TASKS = {t.name: t for t in (DefaultTask, LamaTask, RteTask, CbTask, BoolqTask, WicTask, CopaTask, WscTask,
                              MultircTask, RecordTask)}
assert tuple(TASKS) == choices(TaskName), "config.TaskName and TASKS must list the same tasks"


class MultiTask(Task):
    """Several FewGLUE tasks in one run (``--task rte,cb,boolq``): each task is a group with its own
    prompt, template and answers. Every row carries its own task's answers as candidates (the
    verbalizer's words, COPA's choices, ReCoRD's entities) and is scored through the same
    candidate-scoring path (``data/scoring.py``): for single-token words that is the verbalizer
    head's loss exactly (a softmax over the candidates of log-probabilities normalised over the
    vocabulary is the softmax over their logits). Metrics are each task's own, and their mean."""

    metric = "multitask"
    verbalizer = None
    choices = True

    def __init__(self, tasks: list[Task]):
        self.tasks = {t.name: t for t in tasks}
        self.name = ",".join(self.tasks)
        self.fields = ()
        self.select_metric = {n: t.select_metric for n, t in self.tasks.items()}
        self.data_dir = None

    def groups(self) -> list[str]:
        return list(self.tasks)

    def template_of(self, group: str) -> str:
        return self.tasks[group].default_template

    def fields_of(self, group: str) -> tuple[str, ...]:
        return self.tasks[group].fields

    def has_split(self, split: str) -> bool:
        have = [n for n, t in self.tasks.items() if t.has_split(split)]
        return len(have) == len(self.tasks)  # ReCoRD has no val: no test split for a run holding it

    def rows(self, split: str) -> list[Row]:
        return [self._with_candidates(r) for t in self.tasks.values() for r in t.rows(split)]

    def row_of(self, obj, where, labeled=True, group=None) -> list[Row]:
        """A row of a file mixing the tasks names its task in ``task``."""
        name = group or obj.get("task")
        if name not in self.tasks:
            raise DataError(f"{where}: 'task' {name!r} is not one of {list(self.tasks)}")
        return [self._with_candidates(r) for r in self.tasks[name].row_of(obj, where, labeled)]

    def _with_candidates(self, row: Row) -> Row:
        t = self.tasks[row.group]
        if row.candidates is None:  # a verbalizer task: its words are the row's candidates
            row = dataclasses.replace(row, candidates=tuple(t.verbalizer.values()))
        return row

    def manual_template(self, group: str) -> str:
        return self.tasks[group].manual_template(group)


def build_task(name: str, data_dir=None, relations=None, multi_token: bool = False) -> Task:
    if "," in name:
        return MultiTask([build_task(n.strip()) for n in name.split(",")])
    if name not in TASKS:
        raise DataError(f"data.task: unknown task {name!r}; known: {sorted(TASKS)}")
    cls = TASKS[name]
    if issubclass(cls, LamaTask):
        return cls(data_dir, relations, multi_token)
    return cls(data_dir)
