"""The FewGLUE tasks' metrics against values computed by hand on small fixtures, and their rows (the
eight tasks training from their real files: tests/e2e/test_fewglue_tasks.py)."""
from __future__ import annotations

import json

import pytest

from ptuning_dist.data.collate import Example
from ptuning_dist.data.tasks import Row, build_task
from ptuning_dist.errors import DataError
from ptuning_dist.prompt.template import Encoded
from ptuning_dist.train.evaluate import classification_metrics, multirc_metrics, record_metrics


def _ex(label: int, **values) -> Example:
    row = Row(values, "", str(label), "t", "f:1")
    return Example(Encoded((1,), (), (), 1), label, "t", 0, row)


def test_multirc_f1a_and_em_by_hand():
    # labels: index 0 = "1" (correct option), 1 = "0"; question q1: 3 options, q2: 2 options
    gold = [0, 1, 0, 1, 0]
    preds = [0, 1, 1, 1, 0]  # q1: one correct option missed; q2: both right
    ex = [_ex(g, _unit=u) for g, u in zip(gold, ["q1", "q1", "q1", "q2", "q2"])]
    res = multirc_metrics(preds, ex, ["1", "0"])
    # positives: tp 2 (0 and 4), fn 1 (2), fp 0 -> F1a = 4 / 5; EM: q2 only of 2 questions
    assert res["f1a"] == pytest.approx(0.8) and res["em"] == 0.5 and res["accuracy"] == 0.8


def test_record_em_and_f1_by_hand():
    ex = [_ex(0, _entities=["The Blues", "Chelsea FC"], _answers=["Chelsea"]),
          _ex(0, _entities=["Jose Mourinho", "Costa"], _answers=["Diego Costa", "Costa"])]
    res = record_metrics([1, 1], ex)
    # 1: "chelsea fc" vs "chelsea": P 1/2, R 1 -> F1 2/3, EM 0; 2: "costa" == "costa" -> EM 1, F1 1
    assert res["em"] == 0.5 and res["f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_cb_macro_f1_by_hand():
    ex = [_ex(g) for g in [0, 0, 1, 2]]
    res = classification_metrics([0, 1, 1, 1], ex, ["entailment", "contradiction", "neutral"])
    # class 0: tp 1 fn 1 -> 2/3; class 1: tp 1 fp 2 -> 1/2; class 2: tp 0 -> 0
    assert res["accuracy"] == 0.5 and res["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_record_and_multirc_rows(tmp_path):
    rec = build_task("record").rows("train")[0]
    assert rec.target in rec.candidates and "@placeholder" not in rec.target
    assert rec.label in rec.values["_answers"] and len(rec.candidates) == len(rec.values["_entities"])
    mrc = build_task("multirc").rows("train")
    assert {r.label for r in mrc} == {"0", "1"} and len({r.values["_unit"] for r in mrc}) < len(mrc)
    (tmp_path / "train.jsonl").write_text(json.dumps({"passage": {"text": "A b.", "entities": [{"start": 0, "end": 40}]},
                                                      "qas": [{"query": "@placeholder", "answers": []}]}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: entity span"):
        build_task("record", tmp_path).rows("train")
