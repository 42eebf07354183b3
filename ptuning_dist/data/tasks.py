"""Tasks: where rows come from, which fields they have, and what the target is.

- ``lama``: LAMA-style knowledge probing, the layout of the P-tuning code's fact-retrieval data:
  ``<data_dir>/relations.jsonl`` (one relation a line: ``relation``, a manual ``template`` such as
  ``"The capital of [X] is [Y] ."``, ``label``) and ``<data_dir>/<relation>/<split>.jsonl``
  (``sub_label``, ``obj_label``, ``predicate_id``). The target is ``obj_label``.
- ``rte``, ``cb``, ``boolq``, ``wic``: SuperGLUE JSON lines (the FewGLUE files: ``train.jsonl``,
  ``dev32.jsonl``, ``val.jsonl``); the target is the verbalized ``label``.
- ``default``: the bundled tiny LAMA set (two relations, 40 facts) used by the embedded job.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ptuning_dist.config import TaskName, choices
from ptuning_dist.errors import DataError

BUNDLED_LAMA = Path(__file__).parent / "bundled" / "lama_tiny"


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
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            out.append((n, obj))
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
        sub = _get(obj, "sub_label", where)
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


class SuperGlueTask(Task):
    splits = {"train": "train.jsonl", "dev": "dev32.jsonl", "dev32": "dev32.jsonl", "val": "val.jsonl", "test": "val.jsonl"}
    folder: str

    def default_dir(self) -> Path:
        # The FewGLUE copy beside the project (../shared/data/fewglue/<TASK>), when it is there.
        here = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "fewglue" / self.folder
        if here.is_dir():
            return here.resolve()
        return super().default_dir()

    def has_split(self, split: str) -> bool:
        return split in self.splits and (self.data_dir / self.splits[split]).is_file()

    def rows(self, split: str) -> list[Row]:
        if split not in self.splits:
            raise DataError(f"task {self.name}: unknown split {split!r}; use one of {sorted(self.splits)}")
        return self.read(self.data_dir / self.splits[split])

    def row_of(self, obj, where, labeled=True, group=None) -> list[Row]:
        values = {f: _get(obj, f, where) for f in self.fields}
        if not labeled and "label" not in obj:  # a placeholder label: predictions only
            label = next(iter(self.verbalizer))
            return [Row(values, self.verbalizer[label], label, self.name, where, labeled=False)]
        label = _label_str(_get(obj, "label", where))
        if label not in self.verbalizer:
            raise DataError(f"{where}: label {label!r} not in the verbalizer {sorted(self.verbalizer)}")
        return [Row(values, self.verbalizer[label], label, self.name, where)]

    def manual_template(self, group: str) -> str:
        from ptuning_dist.prompt.template import Template

        return Template(self.default_template).without_prompts().text


class RteTask(SuperGlueTask):
    name, folder = "rte", "RTE"
    fields = ("premise", "hypothesis")
    default_template = "{premise} Question: {hypothesis} ? [P*3] Answer: [MASK] ."
    verbalizer = {"entailment": "yes", "not_entailment": "no"}


class CbTask(SuperGlueTask):
    name, folder = "cb", "CB"
    fields = ("premise", "hypothesis")
    default_template = "{premise} Question: {hypothesis} ? [P*3] Answer: [MASK] ."
    verbalizer = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}
    select_metric = "macro_f1"  # three unbalanced classes: the paper reports CB's F1 beside accuracy


class BoolqTask(SuperGlueTask):
    name, folder = "boolq", "BoolQ"
    fields = ("passage", "question")
    default_template = "{passage} [P*2] Question: {question} ? [P*2] Answer: [MASK] ."
    verbalizer = {"true": "yes", "false": "no"}


class WicTask(SuperGlueTask):
    name, folder = "wic", "WiC"
    fields = ("word", "sentence1", "sentence2")
    default_template = "{sentence1} [P*2] {sentence2} [P*2] Does {word} mean the same ? [MASK] ."
    verbalizer = {"true": "yes", "false": "no"}


class CopaTask(SuperGlueTask):
    """COPA: which of two sentences is the cause (effect) of the premise. The choices are whole
    sentences: each is scored by the log-probability of its tokens after the context (PET's
    pattern, choices lowercased at the start and without final punctuation, as PET does)."""

    name, folder = "copa", "COPA"
    fields = ("premise", "choice1", "choice2", "connective")
    default_template = '"{choice1}" or "{choice2}" ? {premise} , [P*3] {connective} [MASK]'
    choices = True
    metric = "choice"

    def row_of(self, obj, where, labeled=True, group=None) -> list[Row]:
        has = labeled or "label" in obj
        label, question = _get(obj, "label", where) if has else 0, _get(obj, "question", where)
        if label not in (0, 1) or isinstance(label, bool):
            raise DataError(f"{where}: label {label!r} must be 0 or 1")
        if question not in ("cause", "effect"):
            raise DataError(f"{where}: question {question!r} must be 'cause' or 'effect'")
        choices = tuple(_answer(_get(obj, f, where), f, where) for f in ("choice1", "choice2"))
        values = {"premise": _text(_get(obj, "premise", where), "premise", where).rstrip(".!?"),
                  "choice1": choices[0], "choice2": choices[1],
                  "connective": "because" if question == "cause" else "so"}
        return [Row(values, choices[label], str(label), self.name, where, choices, labeled=has)]


class WscTask(SuperGlueTask):
    """WSC as the yes/no question whether the pronoun (span2) refers to the noun phrase (span1):
    every FewGLUE row, both labels, scored by one head (PET instead generates span1 from the rows
    labelled true; this keeps the false rows as training signal and the metric plain accuracy)."""

    name, folder = "wsc", "WSC"
    fields = ("text", "target.span2_text", "target.span1_text")
    default_template = '{text} [P*3] Does " {target.span2_text} " refer to " {target.span1_text} " ? [MASK] .'
    verbalizer = {"true": "yes", "false": "no"}


class MultircTask(SuperGlueTask):
    """MultiRC: one row per (question, answer option), a yes/no verbalizer; metrics F1a (F1 over all
    answer options, positive = correct) and EM (questions whose options are all right)."""

    name, folder = "multirc", "MultiRC"
    fields = ("passage", "question", "answer")
    default_template = "{passage} [P*3] Question: {question} ? Is it {answer} ? [MASK] ."
    verbalizer = {"1": "yes", "0": "no"}
    metric, select_metric = "multirc", "f1a"

    def row_of(self, obj, where, labeled=True, group=None) -> list[Row]:
        passage = _text(_get(obj, "passage.text", where), "passage.text", where)
        questions = _get(obj, "passage.questions", where)
        if not isinstance(questions, list) or not questions:
            raise DataError(f"{where}: passage.questions must be a non-empty list")
        out = []
        for qi, q in enumerate(questions):
            qwhere = f"{where} (question {qi})"
            question = _text(_get(q, "question", qwhere), "question", qwhere)
            for a in _get(q, "answers", qwhere):
                has = labeled or "label" in a
                label = _label_str(_get(a, "label", qwhere)) if has else "0"
                if label not in self.verbalizer:
                    raise DataError(f"{qwhere}: answer label {label!r} must be 0 or 1")
                values = {"passage": passage, "question": question,
                          "answer": _text(_get(a, "text", qwhere), "answer text", qwhere),
                          "_unit": f"{obj.get('idx', where)}/{qi}"}
                out.append(Row(values, self.verbalizer[label], label, self.name, qwhere, labeled=has))
        return out


class RecordTask(SuperGlueTask):
    """ReCoRD: fill the query's @placeholder with one of the passage's entities. Every distinct
    entity is a candidate, scored by the log-probability of the query with it filled in after the
    passage (all candidates of an example in one forward); metrics EM and token F1 of the chosen
    entity against the answers (SQuAD normalisation). FewGLUE has no val split for ReCoRD."""

    name, folder = "record", "ReCoRD"
    fields = ("passage",)
    default_template = "{passage} [P*3] [MASK]"
    choices = True
    metric, select_metric = "record", "f1"

    def row_of(self, obj, where, labeled=True, group=None) -> list[Row]:
        text = _text(_get(obj, "passage.text", where), "passage.text", where)
        entities = []
        for ent in _get(obj, "passage.entities", where):
            start, end = _get(ent, "start", where), _get(ent, "end", where)
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end < len(text)):
                raise DataError(f"{where}: entity span {ent!r} is not inside the passage")
            name = text[start:end + 1].strip()
            if name and name not in entities:
                entities.append(name)
        if not entities:
            raise DataError(f"{where}: the passage has no entities to choose from")
        passage = text.replace("@highlight\n", "- ")
        out = []
        for qi, qa in enumerate(_get(obj, "qas", where)):
            qwhere = f"{where} (query {qi})"
            query = _text(_get(qa, "query", qwhere), "query", qwhere)
            if "@placeholder" not in query:
                raise DataError(f"{qwhere}: query has no @placeholder")
            has = labeled or "answers" in qa
            answers = [_text(_get(a, "text", qwhere), "answer text", qwhere) for a in _get(qa, "answers", qwhere)] \
                if has else []
            gold = next((e for e in entities if e in answers), None) if has else entities[0]
            if gold is None:
                raise DataError(f"{qwhere}: no passage entity is an answer ({answers})")
            cands = tuple(query.replace("@placeholder", e) for e in entities)
            values = {"passage": passage, "_answers": answers, "_entities": entities}
            out.append(Row(values, cands[entities.index(gold)], gold, self.name, qwhere, cands, labeled=has))
        return out


def _text(value, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _answer(value, field: str, where: str) -> str:
    """PET's form of an answer sentence: first letter lowercased, final punctuation dropped."""
    text = _text(value, field, where).rstrip(".!?")
    return text[:1].lower() + text[1:]


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
