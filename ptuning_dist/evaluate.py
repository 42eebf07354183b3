"""Evaluation: LAMA P@1 (per relation and macro-averaged) and classification accuracy / macro-F1.

Predictions are the argmax of the same logits the loss trains (head at the target position,
restricted to the candidates). The prompt table is computed once for the whole evaluation, so
evaluating through the encoder and through the exported table are the same computation.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ptuning_dist.data.collate import Example, collate
from ptuning_dist.model import PTuningModel


@torch.no_grad()
def predict(model: PTuningModel, examples: list[Example], batch_size: int, pad_id: int, device) -> list[int]:
    was_training = model.training
    model.eval()
    table_MH = model.prompt() if model.prompt is not None else None
    preds = []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id).to(device)
        preds_B = model.logits(batch, table_MH).argmax(-1)
        preds.extend(preds_B.tolist())  # host sync: evaluation only, once per batch
    model.train(was_training)
    return preds


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


def evaluate(model: PTuningModel, examples: list[Example], cands, batch_size: int, pad_id: int, device) -> dict:
    preds = predict(model, examples, batch_size, pad_id, device)
    if cands.names is not None:
        return classification_metrics(preds, examples, cands.names)
    return lama_metrics(preds, examples)
