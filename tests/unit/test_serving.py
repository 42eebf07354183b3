"""Serving a trained table: the PEFT PROMPT_TUNING adapter (loaded by the real peft) and
``row_inputs_embeds`` score rows as this project does; ``ptuning-predict`` agrees with evaluation."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ptuning_dist.backbone.tiny import default_backbone
from ptuning_dist.cli import predict as predict_cli
from ptuning_dist.config import from_dict
from ptuning_dist.data.collate import collate
from ptuning_dist.model import PTuningModel
from ptuning_dist.prompt.encoder import PromptTable
from ptuning_dist.prompt.export import load_table
from ptuning_dist.prompt.serving import prefix_slots, row_inputs_embeds
from ptuning_dist.prompt.template import Template
from ptuning_dist.train.build import build_run, examples
from ptuning_dist.train.recipe import train

BUNDLED = "ptuning_dist/data/bundled/lama_tiny"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return default_backbone(tmp_path_factory.mktemp("tiny") / "backbone")


def _trained(tiny_dir, out, template):
    cfg = from_dict({}, {"model.path": str(tiny_dir), "train.output_dir": str(out), "train.max_steps": 5,
                         "prompt.template": template, "data.allowed_vocab": "full"})
    train(cfg, log=lambda *a: None)
    return cfg


def _ours(cfg, out):
    """Our full-vocabulary logits at every dev row's target, through the exported table."""
    run = build_run(cfg, torch.device("cpu"))
    table, _ = load_table(out / "prompt_table")
    model = PTuningModel(run.backbone, PromptTable(table), None).eval()
    ex = examples(run, "dev")
    with torch.no_grad():
        return run, ex, model.logits(collate(ex, run.tok.pad_id))


def test_prefix_templates():
    assert prefix_slots(Template("[P*4] {x}")) == 4 and prefix_slots(Template("[P] [P*2] {x} [MASK]")) == 3
    assert prefix_slots(Template("[P*3] {x} [P*3]")) is None and prefix_slots(Template("{x} [P]")) is None


def test_peft_adapter_scores_rows_as_we_do(tiny_dir, tmp_path):
    cfg = _trained(tiny_dir, tmp_path, "[P*4] {sub_label}")
    _, meta = load_table(tmp_path / "prompt_table")
    assert meta["peft"] == {"P36": "peft/P36", "P37": "peft/P37"}
    run, ex, ours = _ours(cfg, tmp_path)
    for rel in ("P36", "P37"):
        base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
        pm = PeftModel.from_pretrained(base, tmp_path / "prompt_table" / meta["peft"][rel]).eval()
        for i, e in enumerate(ex):
            if e.group != rel:
                continue
            with torch.no_grad():  # PEFT prepends its 4 virtual tokens to the row's own tokens
                logits = pm(input_ids=torch.tensor([e.enc.ids[4:]])).logits[0, -1]
            torch.testing.assert_close(logits, ours[i], rtol=1e-4, atol=1e-4)


def test_inputs_embeds_for_any_template(tiny_dir, tmp_path):
    cfg = _trained(tiny_dir, tmp_path, None)  # the default [P*3] {sub_label} [P*3]: not a prefix
    _, meta = load_table(tmp_path / "prompt_table")
    assert meta["peft"]["P36"].startswith("none: the template")
    run, ex, ours = _ours(cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for i, e in enumerate(ex):
        embeds = row_inputs_embeds(tmp_path / "prompt_table", hf, tok, e.row.values, group=e.group)
        assert embeds.shape == (1, len(e.enc.ids), run.hidden_size)
        with torch.no_grad():
            logits = hf(inputs_embeds=embeds).logits[0, -1]
        torch.testing.assert_close(logits, ours[i], rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="name one"):
        row_inputs_embeds(tmp_path / "prompt_table", hf, tok, ex[0].row.values)


def test_predict_agrees_with_evaluation(tiny_dir, tmp_path, capsys):
    train(from_dict({}, {"model.path": str(tiny_dir), "train.output_dir": str(tmp_path), "train.max_steps": 5}),
          log=lambda *a: None)
    ev = json.loads((tmp_path / "eval.json").read_text())
    dev = tmp_path / "dev.jsonl"  # both relations' dev rows in one file: each names its relation
    dev.write_text("".join(open(f"{BUNDLED}/{r}/dev.jsonl").read() for r in ("P36", "P37")))
    out = tmp_path / "pred.jsonl"
    rc = predict_cli.main(["--model", str(tiny_dir), "--prompt_table", str(tmp_path / "prompt_table"),
                           "--input", str(dev), "--out", str(out), "--top_k", "3"])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 16 and all(len(x["top"]) == 3 and x["top"][0]["answer"] == x["prediction"] for x in lines)
    for rel in ("P36", "P37"):
        mine = [x for x in lines if x["group"] == rel]
        assert sum(x["prediction"] == x["label"] for x in mine) / len(mine) == ev["ptuning"]["p@1_per_relation"][rel]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["p@1_per_relation"] == ev["ptuning"]["p@1_per_relation"]
    unlabeled = tmp_path / "new.jsonl"
    unlabeled.write_text(json.dumps({"sub_label": "France", "predicate_id": "P36"}) + "\n")
    assert predict_cli.main(["--model", str(tiny_dir), "--prompt_table", str(tmp_path / "prompt_table"),
                             "--input", str(unlabeled), "--out", str(out)]) == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert "label" not in line and line["group"] == "P36" and line["prediction"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sub_label": "France", "predicate_id": "P999"}) + "\n")
    assert predict_cli.main(["--model", str(tiny_dir), "--prompt_table", str(tmp_path / "prompt_table"),
                             "--input", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:1: relation 'P999'" in capsys.readouterr().err
