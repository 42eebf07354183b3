"""Evaluation: LAMA P@1 (per relation and macro-averaged) and classification accuracy / macro-F1.

Predictions are the argmax of the same logits the loss trains (head at the target position,
restricted to the candidates). The prompt table is computed once for the whole evaluation, so
evaluating through the encoder and through the exported table are the same computation.
"""
from __future__ import annotations

import json
import string
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from ptuning_dist.data.collate import Example, collate
from ptuning_dist.model import PTuningModel
from ptuning_dist.parallel.launch import data_parallel
from ptuning_dist.prompt.export import ENCODER_FILE, save_encoder, save_table
from ptuning_dist.train.build import examples


@torch.no_grad()
def predict(model: PTuningModel, examples: list[Example], batch_size: int, pad_id: int, device,
            table_MH: torch.Tensor | None = None, pipeline=None, pack_to: int | None = None,
            top_k: int = 0) -> list:
    """Argmax predictions. ``table_MH``: the prompt table to use (an exported one, or an empty
    one for the manual baseline); by default the model's prompt source, computed once here.
    ``pipeline``: a ``parallel.pipeline.PipelineSchedule`` when the model is one pipeline stage.
    ``pack_to``: pack the batches (``RunConfig.pack_to``; the predictions are the same).

    With several ranks each predicts an equal share (padded), so every rank runs the same number
    of forwards (ZeRO-3 gathers are collectives), and the shares are gathered.
    ``top_k`` > 0: each prediction is (argmax, [(index, log-probability over the candidates)] of
    the k best), for ``ptuning-predict``."""
    was_training = model.training
    model.eval()
    if table_MH is None:
        table_MH = model.prompt() if model.prompt is not None else None
    rank, world, group = data_parallel()  # TP replicas predict the same share together
    share = -(-len(examples) // world)
    mine = examples[rank * share : (rank + 1) * share]
    mine = mine + [examples[0]] * (share - len(mine))
    preds = []
    for i in range(0, share, batch_size):
        batch = collate(mine[i : i + batch_size], pad_id, pack_to=pack_to).to(device)
        summary = _argmax if not top_k else (lambda logits: _top(logits, top_k))
        if pipeline is not None:
            preds.extend(pipeline.outputs(batch, table_MH, summary))
        else:
            preds.extend(summary(model.logits(batch, table_MH)))
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, preds, group=group)
        preds = [p for s in shares for p in s]
    model.train(was_training)
    return preds[: len(examples)]


def _argmax(logits_EK: torch.Tensor) -> list[int]:
    return logits_EK.argmax(-1).tolist()  # host sync: evaluation only


def _top(logits_EK: torch.Tensor, k: int) -> list:
    """(argmax, the k best (index, log-probability over the candidates)) per row; host sync: predict only."""
    logp = torch.log_softmax(logits_EK.float(), dim=-1)
    val, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [(int(i[0]), list(zip(i.tolist(), v.tolist()))) for i, v in zip(idx, val)]


def lama_metrics(preds: list[int], examples: list[Example]) -> dict:
    hits = defaultdict(list)
    for p, e in zip(preds, examples):
        hits[e.group].append(p == e.label)
    per_relation = {g: sum(h) / len(h) for g, h in sorted(hits.items())}
    return {
        "p@1_macro": sum(per_relation.values()) / len(per_relation),
        "p@1_micro": sum(sum(h) for h in hits.values()) / len(preds),
        "p@1_per_relation": per_relation,
        "n": len(preds),
    }


def classification_metrics(preds: list[int], examples: list[Example], labels: list[str]) -> dict:
    gold = [e.label for e in examples]
    acc = sum(p == g for p, g in zip(preds, gold)) / len(gold)
    f1s = []
    for k in range(len(labels)):
        tp = sum(p == k and g == k for p, g in zip(preds, gold))
        fp = sum(p == k and g != k for p, g in zip(preds, gold))
        fn = sum(p != k and g == k for p, g in zip(preds, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s), "n": len(gold)}


def multirc_metrics(preds: list[int], examples: list[Example], labels: list[str]) -> dict:
    """F1a: F1 over every answer option (positive: the option is correct); EM: the share of
    questions whose options are all predicted right (SuperGLUE's MultiRC metrics)."""
    pos = labels.index("1")
    tp = sum(p == pos and e.label == pos for p, e in zip(preds, examples))
    fp = sum(p == pos and e.label != pos for p, e in zip(preds, examples))
    fn = sum(p != pos and e.label == pos for p, e in zip(preds, examples))
    right = defaultdict(list)
    for p, e in zip(preds, examples):
        right[e.row.values["_unit"]].append(p == e.label)
    return {"f1a": 2 * tp / (2 * tp + fp + fn) if tp else 0.0, "em": sum(all(r) for r in right.values()) / len(right),
            "accuracy": sum(p == e.label for p, e in zip(preds, examples)) / len(examples), "n": len(examples)}


def _normalize(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return [w for w in text.split() if w not in ("a", "an", "the")]


def _f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred), _normalize(gold)
    common = sum((Counter(p) & Counter(g)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def record_metrics(preds: list[int], examples: list[Example]) -> dict:
    """EM and token F1 of the chosen entity against the query's answers (the best answer counts)."""
    em = f1 = 0.0
    for p, e in zip(preds, examples):
        chosen, answers = e.row.values["_entities"][p], e.row.values["_answers"]
        em += max(float(_normalize(chosen) == _normalize(a)) for a in answers)
        f1 += max(_f1(chosen, a) for a in answers)
    return {"em": em / len(examples), "f1": f1 / len(examples), "n": len(examples)}


def evaluate(model: PTuningModel, examples: list[Example], cands, batch_size: int, pad_id: int, device,
             table_MH: torch.Tensor | None = None, pipeline=None, pack_to: int | None = None) -> dict:
    preds = predict(model, examples, batch_size, pad_id, device, table_MH, pipeline, pack_to)
    return metrics(preds, examples, cands)


def metrics(preds: list[int], examples: list[Example], cands) -> dict:
    """The task's metrics of these predictions (several tasks: each task's own, and their mean)."""
    if cands.metric == "multitask":
        from ptuning_dist.data.collate import Candidates
        from ptuning_dist.train.select import headline_score

        per_task = {}
        for name, (metric, names, _) in cands.per_task.items():
            mine = [(p, e) for p, e in zip(preds, examples) if e.group == name]
            if mine:
                per_task[name] = metrics([p for p, _ in mine], [e for _, e in mine], Candidates(None, names, metric))
        scores = [headline_score(r, cands.per_task[n][2]) for n, r in per_task.items()]  # each its select_metric
        return {"macro": sum(scores) / len(scores), "per_task": per_task, "n": len(examples)}
    if cands.metric == "choice":  # the gold candidate's index: accuracy
        return {"accuracy": sum(p == e.label for p, e in zip(preds, examples)) / len(examples), "n": len(examples)}
    if cands.metric == "multirc":
        return multirc_metrics(preds, examples, cands.names)
    if cands.metric == "record":
        return record_metrics(preds, examples)
    if cands.names is not None:
        return classification_metrics(preds, examples, cands.names)
    return lama_metrics(preds, examples)


def export_and_evaluate(model: PTuningModel, encoder, parts, eval_ex: list[Example], test_ex, out: Path, D,
                        pipeline, pack_to: int | None, say, step: int, selection) -> dict:
    """The end of a run: export the table (and the encoders) as they are now (each group's best
    step after ``Selection.restore``), then evaluate through the table (what inference uses) and
    the manual baseline on the eval split and, when there is one, the test split; rank 0 writes
    ``eval.json``. Pipeline stages after the first have no table: their layers do not read it."""
    cfg = parts.cfg
    table_MH = encoder.export_table().to(D.device) if encoder is not None else None
    kw = dict(batch_size=cfg.train.eval_batch_size, pad_id=parts.tok.pad_id, device=D.device, pipeline=pipeline,
              pack_to=pack_to)
    no_prompt = torch.zeros((0, parts.hidden_size), device=D.device)

    def both(split: str, ex: list[Example]) -> dict:
        return {"ptuning": evaluate(model, ex, parts.cands, table_MH=table_MH, **kw),
                "manual_baseline": evaluate(model, examples(parts, split, manual=True), parts.cands,
                                            table_MH=no_prompt, **kw)}

    dev = both(cfg.data.eval_split, eval_ex)
    if cfg.train.select_best and selection.states:
        selected = selection.summary()
    else:  # the last step's table: scored by this evaluation
        selected = {n: {"step": step, "score": sc} for n, sc in selection.scores(dev["ptuning"]).items()}
    res = {"step": step, "split": cfg.data.eval_split, **dev, "selected": selected,
           "prompt_table": str(out / "prompt_table")}
    if test_ex is not None:
        res["test"] = {"split": cfg.data.test_split, **both(cfg.data.test_split, test_ex)}
    if D.is_main:
        save_encoder(out / ENCODER_FILE, encoder)
        write_table(out / "prompt_table", table_MH, parts,
                    {"task": cfg.data.task, "encoder": encoder.kind, "steps": step, "selected": selected})
        (out / "eval.json").write_text(json.dumps(res, indent=2) + "\n")
    line = (f"eval {cfg.data.eval_split}: p-tuning {headline(res['ptuning'])} | "
            f"manual template {headline(res['manual_baseline'])}")
    if test_ex is not None:
        t = res["test"]
        line += f"; {t['split']}: p-tuning {headline(t['ptuning'])} | manual {headline(t['manual_baseline'])}"
    say(f"{line}; table -> {out / 'prompt_table'}")
    D.barrier()
    return res


def write_table(table_dir: Path, table_MH: torch.Tensor, parts, extra: dict) -> Path:
    """The exported table with its sidecar, and a PEFT adapter per pure-prefix group
    (``prompt/serving.py``; the sidecar's ``peft`` says where, or why none)."""
    from ptuning_dist.backbone.megatron_import import hf_config
    from ptuning_dist.prompt.serving import save_peft_adapters

    peft = save_peft_adapters(table_dir, table_MH.cpu(), parts.groups, parts.templates, hf_config(parts.model_path),
                              str(parts.model_path), parts.tok.bos_id is not None)
    return save_table(table_dir, table_MH, template=parts.template.text, templates=parts.templates,
                      ident=parts.ident,
                      tokenizer=str(parts.model_path), vocab_size=parts.tok.vocab_size, groups=parts.groups,
                      extra={**extra, "peft": peft})


def headline(res: dict) -> str:
    if "per_task" in res:
        return f"macro {res['macro']:.3f} over {len(res['per_task'])} tasks (" + ", ".join(
            f"{n} {headline(r)}" for n, r in res["per_task"].items()) + ")"
    if "f1a" in res:
        return f"F1a {res['f1a']:.3f} EM {res['em']:.3f}"
    if "f1" in res:
        return f"F1 {res['f1']:.3f} EM {res['em']:.3f}"
    if "macro_f1" in res:
        return f"acc {res['accuracy']:.3f} macro-F1 {res['macro_f1']:.3f}"
    if "accuracy" in res:
        return f"acc {res['accuracy']:.3f}"
    return f"P@1 {res['p@1_macro']:.3f} (macro over {len(res['p@1_per_relation'])} relations)"
