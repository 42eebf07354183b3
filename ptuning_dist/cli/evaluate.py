"""``ptuning-evaluate`` (``launchers/evaluate.py``): evaluate an exported prompt table (no encoder)
or the manual-template baseline on a split, in one process."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ptuning_dist.cli import args as cli_args
from ptuning_dist.cli.common import Parser, run
from ptuning_dist.errors import PTuningError

RUN_FIELDS = ("model.path", "model.dtype", "model.splice", "data.task", "data.data_dir", "data.relations",
              "data.allowed_vocab", "data.multi_token", "data.candidate_score", "data.max_seq_len", "train.eval_batch_size", "prompt.template",
              "train.output_dir")

DESCRIPTION = ("Evaluate an exported prompt table (no encoder) or the manual-template baseline on a split, "
               "in one process.")


@dataclass
class EvalArgs:
    prompt_table: str | None = None
    """A directory with prompt_table.safetensors and its prompt_table.json sidecar (what training
    exports to <output_dir>/prompt_table)."""
    manual: bool = False
    """Evaluate the manual-template baseline instead of a prompt table."""
    split: str = "test"
    """The split to evaluate."""
    out: str | None = None
    """Also write the results as JSON to this file."""


def main(argv=None) -> int:
    def go():
        from ptuning_dist.model import PTuningModel
        from ptuning_dist.prompt.encoder import PromptTable
        from ptuning_dist.prompt.export import adopt_template, check_templates, load_table
        from ptuning_dist.train.build import build_run, examples
        from ptuning_dist.train.evaluate import evaluate

        p = Parser(prog="ptuning-evaluate", description=DESCRIPTION)
        dests = cli_args.add_run_config(p, only=RUN_FIELDS)
        own = cli_args.add_fields(p, EvalArgs)
        ns = p.parse_args(argv)
        cfg, args = cli_args.run_config(ns, dests), cli_args.build(EvalArgs, ns, own)
        if bool(args.prompt_table) == bool(args.manual):
            raise PTuningError("ptuning-evaluate: give exactly one of --prompt_table DIR or --manual")
        if args.prompt_table:
            # The table only fits the template it was trained with: take it from the sidecar.
            _, meta = load_table(args.prompt_table)
            adopt_template(cfg, meta)
        run_ = build_run(cfg)
        prompt = None
        if args.prompt_table:  # this backbone's table, its templates; the rows of each group: its mapping
            table_MH, _ = load_table(args.prompt_table, ident=run_.ident)
            check_templates(meta, run_.templates, args.prompt_table)
            run_.groups = meta["groups"]
            prompt = PromptTable(table_MH).to(run_.device)
        cands = run_.cands.tensor()
        cands = None if cands is None else cands.to(run_.device)
        model = PTuningModel(run_.backbone, prompt, cands, cfg.model.splice)
        model.frozen.mean_score = cfg.data.candidate_score == "mean"
        ex = examples(run_, args.split, manual=args.manual)
        res = evaluate(model, ex, run_.cands, cfg.train.eval_batch_size, run_.tok.pad_id, run_.device,
                       pack_to=cfg.pack_to)
        res["split"] = args.split
        text = json.dumps(res, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")

    return run(go)
