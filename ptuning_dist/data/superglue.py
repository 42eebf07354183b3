"""The eight FewGLUE tasks (SuperGLUE JSON lines: ``train.jsonl``, ``dev32.jsonl``, ``val.jsonl``;
by default from ``../shared/data/fewglue/<TASK>``): RTE, CB, BoolQ, WiC and WSC score a verbalizer's
words, MultiRC one row per answer option, COPA and ReCoRD their candidate answers token by token
(``data/scoring.py``)."""
from __future__ import annotations

from pathlib import Path

from ptuning_dist.data.taskbase import Row, Task, _answer, _get, _label_str, _text
from ptuning_dist.errors import DataError


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
