"""``ptuning-predict`` (``launchers/predict.py``): per-row predictions and their scores for any JSONL
of the task's fields, through an exported prompt table, batched, on either backend and any layout
(one process, or under torchrun / deepspeed with --tp/--pp/--ds_config/--fsdp2 as in training).

Each output line: ``where`` (input file:line), ``group`` (relation or task), ``prediction`` (the
label name, answer or object), ``logprob`` (its log-probability over the candidates), ``top`` (the
``--top_k`` best with theirs) and, for rows that carry a label, ``label``. Written by rank 0 to
``OUT.tmp`` and renamed: never half a file. When every row is labelled the task's metrics are
printed too (the same numbers ``ptuning-evaluate`` gives for that file).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ptuning_dist.cli import args as cli_args
from ptuning_dist.cli.common import Parser, run
from ptuning_dist.cli.evaluate import RUN_FIELDS as EVAL_FIELDS
from ptuning_dist.errors import PTuningError

RUN_FIELDS = (*EVAL_FIELDS, "model.backend", "parallel.tp", "parallel.pp", "parallel.ds_config", "parallel.fsdp2",
              "parallel.dist_timeout_s")
DESCRIPTION = "Predict (with scores) for any JSONL of the task's fields, through an exported prompt table."


@dataclass
class PredictArgs:
    prompt_table: str
    """A directory with prompt_table.safetensors and its prompt_table.json sidecar."""
    input: str
    """A JSONL file of rows with the task's fields (labels optional; LAMA rows name their relation
    in predicate_id, rows of several tasks theirs in task)."""
    out: str
    """The predictions, one JSON object per input row (JSONL)."""
    top_k: int = 5
    """How many of the best answers (with log-probabilities) each line lists."""


def answer_name(run_, e, idx: int) -> str:
    """What prediction ``idx`` (an index into the row's candidates) means."""
    row, cands = e.row, run_.cands
    if cands.metric == "multitask":
        metric, names, _ = cands.per_task[e.group]
        return names[idx] if names is not None and metric != "record" else _choice(row, idx, metric)
    if cands.metric in ("choice", "record") or (cands.scored and cands.metric == "lama"):
        return _choice(row, idx, cands.metric)
    if cands.names is not None:
        return cands.names[idx]
    token = idx if cands.ids is None else cands.ids[idx]  # LAMA: a vocabulary id
    return run_.tok.decode([token]).strip()


def _choice(row, idx: int, metric: str) -> str:
    return row.values["_entities"][idx] if metric == "record" else row.candidates[idx]


def main(argv=None) -> int:
    def go():
        import torch

        from ptuning_dist.model import PTuningModel
        from ptuning_dist.parallel.parallelize import ParallelPlan, parallelize
        from ptuning_dist.prompt.encoder import PromptTable
        from ptuning_dist.prompt.export import adopt_template, check_templates, load_table
        from ptuning_dist.train.build import build_run, encode, resolve_model_path
        from ptuning_dist.train.evaluate import metrics, predict

        p = Parser(prog="ptuning-predict", description=DESCRIPTION)
        dests = cli_args.add_run_config(p, only=RUN_FIELDS)
        own = cli_args.add_fields(p, PredictArgs)
        ns = p.parse_args(argv)
        cfg, args = cli_args.run_config(ns, dests), cli_args.build(PredictArgs, ns, own)
        if args.top_k < 1:
            raise PTuningError(f"--top_k: must be >= 1, got {args.top_k}")
        inp, out = Path(args.input), Path(args.out)
        if not out.parent.is_dir():
            raise PTuningError(f"--out {out}: its directory does not exist")
        table_MH, meta = load_table(args.prompt_table)
        adopt_template(cfg, meta)
        plan = ParallelPlan.from_config(cfg)
        D = plan.start()
        model_dir = resolve_model_path(cfg)
        with plan.loading():
            run_ = build_run(cfg, D.device, fill=plan.fill(model_dir))
        load_table(args.prompt_table, ident=run_.ident)  # the table fits this backbone
        check_templates(meta, run_.templates, args.prompt_table)
        run_.groups = meta["groups"]
        prompt = PromptTable(table_MH).to(D.device) if run_.backbone.is_first_stage else None
        cands = run_.cands.tensor()
        model = PTuningModel(run_.backbone, prompt, None if cands is None else cands.to(D.device), cfg.model.splice)
        model.frozen.mean_score = cfg.data.candidate_score == "mean"
        par = parallelize(model, plan, model_dir)  # model_dir: the memory model behind zero3_gather auto
        ex = encode(run_, run_.task.read(inp, labeled=False))
        if not ex:
            raise PTuningError(f"--input {inp}: no rows")
        with par.hold(), torch.no_grad():
            got = predict(model, ex, cfg.train.eval_batch_size, run_.tok.pad_id, D.device, pipeline=par.pipeline,
                          pack_to=cfg.pack_to if par.pipeline is None else None, top_k=args.top_k)
        if D.is_main:
            tmp = out.with_name(out.name + ".tmp")
            with tmp.open("w") as f:
                for e, (best, top) in zip(ex, got):
                    rec = {"where": e.row.where, "group": e.group, "prediction": answer_name(run_, e, best),
                           "logprob": top[0][1], "top": [{"answer": answer_name(run_, e, i), "logprob": lp}
                                                         for i, lp in top]}
                    if e.row.labeled:
                        rec["label"] = e.row.label
                    f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
            print(f"{len(ex)} predictions -> {out}")
            if all(e.row.labeled for e in ex):
                print(json.dumps(metrics([b for b, _ in got], ex, run_.cands)))
        D.barrier()

    return run(go)
