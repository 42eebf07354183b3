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
