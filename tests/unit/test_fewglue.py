"""The eight FewGLUE tasks: each reads its real files (../shared/data/fewglue) and trains a few steps;
the paper's metrics against values computed by hand on small fixtures."""
from __future__ import annotations

import json

import pytest
import torch

from ptuning_dist.config import from_dict
from ptuning_dist.data.collate import Example
from ptuning_dist.data.tasks import Row, build_task
from ptuning_dist.errors import DataError
from ptuning_dist.prompt.template import Encoded
from ptuning_dist.train.evaluate import classification_metrics, multirc_metrics, record_metrics
from ptuning_dist.train.recipe import train

# rows per split as the files hold them (MultiRC: one row per answer option; ReCoRD: per query)
SIZES = {"rte": (32, 32, 277), "cb": (32, 32, 56), "boolq": (32, 32, 3270), "wic": (32, 32, 638),
         "copa": (32, 32, 100), "wsc": (32, 32, 104), "multirc": (154, 167, 4848), "record": (32, 32, None)}
HEADLINE = {"rte": "accuracy", "cb": "macro_f1", "boolq": "accuracy", "wic": "accuracy", "copa": "accuracy",
            "wsc": "accuracy", "multirc": "f1a", "record": "f1"}


@pytest.mark.parametrize("name", list(SIZES))
def test_task_reads_its_real_files_and_trains(family_dirs, tmp_path, name):
    task = build_task(name)
    train_n, dev_n, test_n = SIZES[name]
    assert len(task.rows("train")) == train_n and len(task.rows("dev")) == dev_n
    assert task.has_split("test") == (test_n is not None)
    if test_n is not None:
        assert len(task.rows("test")) == test_n
    cfg = from_dict({}, {"model.path": str(family_dirs["gpt2"]), "data.task": name, "data.max_seq_len": 160,
                         "data.test_split": None, "train.max_steps": 2, "train.micro_batch_size": 4,
                         "train.output_dir": str(tmp_path), "train.log_every": 1})
    res = train(cfg, log=lambda *a: None)
    assert res["ptuning"]["n"] == dev_n and 0.0 <= res["ptuning"][HEADLINE[name]] <= 1.0
    assert res["selected"][name]["score"] == res["ptuning"][HEADLINE[name]]  # what selection compares
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) and v > 0 for v in losses)


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
