"""Answers of several tokens (data/scoring.py, model.candidate_scores): each candidate's score is the
sum of Hugging Face's own log-probabilities of its tokens; COPA end to end."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ptuning_dist.backbone.hf import HFBackbone
from ptuning_dist.config import from_dict
from ptuning_dist.data.collate import Example, collate
from ptuning_dist.data.tasks import CopaTask
from ptuning_dist.errors import DataError
from ptuning_dist.model import PTuningModel
from ptuning_dist.prompt.template import Encoded
from ptuning_dist.train.build import build_run, examples
from ptuning_dist.train.recipe import train

CANDS = [((5, 6, 7), (9,), (11, 3)), ((3, 4), (8, 2))]  # 3 and 2 candidates of 1-3 tokens
CONTEXTS = [(1, 2, 3, 4), (7, 8, 9)]


def hf_scores(hf, ctx, cands) -> list[float]:
    """The reference: Hugging Face's forward over context + candidate, log-probs of its tokens summed."""
    out = []
    for c in cands:
        logp = torch.log_softmax(hf(input_ids=torch.tensor([ctx + c])).logits[0].float(), -1)
        out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(c)))
    return out


def scoring_examples():
    return [Example(Encoded(ctx, (), (), -1), 0, "g", 0, cand_ids=cands) for ctx, cands in zip(CONTEXTS, CANDS)]


@pytest.mark.parametrize("pack_to", [None, 32], ids=["padded", "packed"])
def test_candidate_scores_are_hf_log_probs(family_dirs, pack_to):
    path = family_dirs["gpt2"]
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    model = PTuningModel(HFBackbone.from_pretrained(path), None, None)
    batch = collate(scoring_examples(), pad_id=0, pack_to=pack_to)
    assert batch.score_tokens_Q.tolist() == [5, 6, 7, 9, 11, 3, 3, 4, 8, 2]
    with torch.no_grad():
        scores_XK = model.logits(batch, torch.zeros(0, hf.config.hidden_size))
        for x, (ctx, cands) in enumerate(zip(CONTEXTS, CANDS)):
            ref = hf_scores(hf, list(ctx), [list(c) for c in cands])
            torch.testing.assert_close(scores_XK[x, : len(cands)], torch.tensor(ref), rtol=1e-5, atol=1e-5)
        assert scores_XK[1, 2] == float("-inf")  # the second example has two candidates of K = 3
        model.frozen.mean_score = True
        mean_XK = model.logits(batch, torch.zeros(0, hf.config.hidden_size))
        torch.testing.assert_close(mean_XK[0], scores_XK[0] / torch.tensor([3.0, 1.0, 2.0]))


def test_copa_rows_and_candidates(family_dirs, tmp_path):
    task = CopaTask(None)
    rows = task.rows("train")
    assert len(rows) == 32 and all(len(r.candidates) == 2 and r.target in r.candidates for r in rows)
    first = rows[0]  # "The chandelier shattered on the floor." cause: choice1
    assert first.values["connective"] == "because" and first.target == "the chandelier dropped from the ceiling"
    cfg = from_dict({}, {"model.path": str(family_dirs["gpt2"]), "data.task": "copa",
                         "train.output_dir": str(tmp_path)})
    run = build_run(cfg, torch.device("cpu"))
    ex = examples(run, "train")
    tok = run.tok
    e = ex[0]
    assert e.label == 0 and [tok.decode(c) for c in e.cand_ids] == [" the chandelier dropped from the ceiling",
                                                                    " the chandelier's lights flickered on and off"]
    assert tok.decode(e.enc.ids).endswith(" because")  # the context ends before the answer
    assert len(task.rows("test")) == 100  # val.jsonl


def test_copa_trains_and_reports_accuracy(family_dirs, tmp_path):
    cfg = from_dict({}, {"model.path": str(family_dirs["gpt2"]), "data.task": "copa", "train.max_steps": 4,
                         "train.micro_batch_size": 8, "train.output_dir": str(tmp_path), "train.log_every": 1})
    res = train(cfg, log=lambda *a: None)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["loss"] > 0 for r in recs)
    assert set(res["ptuning"]) == {"accuracy", "n"} and res["ptuning"]["n"] == 32
    assert res["test"]["ptuning"]["n"] == 100 and 0 <= res["test"]["manual_baseline"]["accuracy"] <= 1


def test_copa_bad_rows(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"premise": "x", "choice1": "a", "choice2": "b",
                                                      "question": "why", "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: question 'why'"):
        CopaTask(tmp_path).rows("train")
    (tmp_path / "train.jsonl").write_text(json.dumps({"premise": "x", "choice1": "a", "choice2": "",
                                                      "question": "cause", "label": 1}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'choice2'"):
        CopaTask(tmp_path).rows("train")


def test_several_tasks_in_one_run(family_dirs, tmp_path):
    """rte, cb and copa in one job: a prompt, template and answers each; every row scored through
    the candidate path, which for RTE's single-token words is the verbalizer head's loss."""
    from ptuning_dist.prompt.export import load_table

    cfg = from_dict({}, {"model.path": str(family_dirs["gpt2"]), "data.task": "rte,cb,copa", "train.max_steps": 2,
                         "train.micro_batch_size": 4, "train.output_dir": str(tmp_path / "multi"),
                         "data.max_seq_len": 160})
    run = build_run(cfg, torch.device("cpu"))
    assert run.groups.names == ("rte", "cb", "copa") and run.groups.n_prompt == (3, 3, 3)
    multi = [e for e in examples(run, "train") if e.group == "rte"]
    single_run = build_run(from_dict({}, {"model.path": str(family_dirs["gpt2"]), "data.task": "rte",
                                          "train.output_dir": str(tmp_path / "one"), "data.max_seq_len": 160}),
                           torch.device("cpu"))
    single = examples(single_run, "train")
    assert [e.label for e in multi] == [e.label for e in single] and multi[0].cand_ids and not single[0].cand_ids
    table = torch.randn(9, run.hidden_size) * 0.1  # rte's rows are the first three in both runs
    head = PTuningModel(single_run.backbone, None, single_run.cands.tensor())
    scored = PTuningModel(run.backbone, None, None)
    with torch.no_grad():
        a = torch.nn.functional.cross_entropy(head.logits(collate(single[:6], 0), table), torch.tensor(
            [e.label for e in single[:6]]))
        b = torch.nn.functional.cross_entropy(scored.logits(collate(multi[:6], 0), table), torch.tensor(
            [e.label for e in multi[:6]]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    res = train(cfg, log=lambda *a: None)
    assert set(res["ptuning"]["per_task"]) == {"rte", "cb", "copa"} and set(res["selected"]) == {"rte", "cb", "copa"}
    assert res["selected"]["cb"]["score"] == res["ptuning"]["per_task"]["cb"]["macro_f1"]  # CB selects on F1
    _, meta = load_table(tmp_path / "multi" / "prompt_table")
    assert meta["groups"].to_json() == {"rte": [0, 3], "cb": [3, 6], "copa": [6, 9]}
    assert meta["templates"]["copa"] == CopaTask.default_template


@pytest.mark.parametrize("over,field", [({"data.task": "rte,lama"}, "data.task"), ({"data.task": "rte,rte"}, "data.task"),
                                        ({"data.task": "rte,cb", "prompt.template": "[P] {premise} [MASK]"},
                                         "prompt.template"),
                                        ({"data.task": "rte,cb", "data.data_dir": "/x"}, "data.data_dir"),
                                        ({"data.task": "rte,cb", "prompt.sharing": "shared"}, "prompt.sharing"),
                                        ({"data.task": "sst2"}, "data.task")])
def test_several_tasks_config_errors(over, field):
    from ptuning_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        from_dict({}, over)


def test_lama_objects_of_several_tokens(family_dirs, tmp_path):
    """data.multi_token: each relation's objects scored token by token (BPE splits some of them)."""
    cfg = from_dict({}, {"model.path": str(family_dirs["gpt2"]), "data.multi_token": True, "train.max_steps": 2,
                         "train.micro_batch_size": 4, "train.output_dir": str(tmp_path)})
    run = build_run(cfg, torch.device("cpu"))
    ex = examples(run, "train")
    p36 = [e for e in ex if e.group == "P36"]
    assert len({e.row.candidates for e in p36}) == 1 and len(p36[0].cand_ids) == len(p36[0].row.candidates) == 40  # 24 + 8 + 8 facts
    assert any(len(c) > 1 for c in p36[0].cand_ids)  # objects of several tokens are scored, not refused
    assert all(e.row.candidates[e.label] == e.row.target for e in ex)
    res = train(cfg, log=lambda *a: None)
    assert set(res["ptuning"]["p@1_per_relation"]) == {"P36", "P37"} and res["test"]["ptuning"]["n"] == 16
