"""Command-line entry points behind ``launchers/{train,evaluate,export}.py``.

Flags map onto fields of the config tree (``--lr`` -> ``train.lr``) and override ``--config``;
every value is type-checked by ``ptuning_dist.config`` and errors name the flag's field.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from ptuning_dist.config import RunConfig, from_dict, load_file
from ptuning_dist.errors import PTuningError

# flag -> config field; help text comes from the field's docstring in config.py
TRAIN_FLAGS = {
    "model": "model.path", "dtype": "model.dtype", "backend": "model.backend", "splice": "model.splice",
    "encoder": "prompt.encoder", "template": "prompt.template",
    "task": "data.task", "data_dir": "data.data_dir", "relations": "data.relations",
    "allowed_vocab": "data.allowed_vocab", "max_seq_len": "data.max_seq_len",
    "packing": "data.packing",
    "train_split": "data.train_split", "eval_split": "data.eval_split",
    "output_dir": "train.output_dir", "max_steps": "train.max_steps", "lr": "train.lr",
    "weight_decay": "train.weight_decay", "warmup_steps": "train.warmup_steps",
    "max_grad_norm": "train.max_grad_norm", "micro_batch_size": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size", "seed": "train.seed",
    "log_every": "train.log_every", "eval_every": "train.eval_every",
    "eval_batch_size": "train.eval_batch_size", "save_every": "train.save_every",
    "keep_checkpoints": "train.keep_checkpoints", "resume": "train.resume",
    "tp": "parallel.tp", "pp": "parallel.pp", "ds_config": "parallel.ds_config", "fsdp2": "parallel.fsdp2",
    "activation_checkpointing": "parallel.activation_checkpointing", "dist_timeout_s": "parallel.dist_timeout_s",
}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():  # say it, so DeepSpeed does not warn on every rank that it guessed
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("torch.distributed").setLevel(logging.WARNING)
    # DeepSpeed 0.19.8 calls torch's deprecated all_gather_into_tensor on every gather
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def parse_run_config(argv, flags: dict[str, str], prog: str, extra=None) -> tuple[RunConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a YAML/JSON run config; flags override it")
    for flag, dotted in flags.items():
        p.add_argument(f"--{flag}", default=None, help=f"sets {dotted}")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    if extra:
        extra(p)
    args = p.parse_args(argv)
    base = load_file(args.config) if args.config else {}
    overrides = {dotted: getattr(args, flag) for flag, dotted in flags.items() if getattr(args, flag) is not None}
    return from_dict(base, overrides), args


def _run(fn) -> int:
    from ptuning_dist.train.stop import EXIT_STOPPED, StopRequested

    _quiet_libraries()
    try:
        fn()
    except PTuningError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StopRequested as e:  # preempted / asked to stop: the checkpoint is written, requeue and resume
        print(str(e), file=sys.stderr)
        return EXIT_STOPPED
    return 0


def train_main(argv=None) -> int:
    def go():
        from ptuning_dist.train.loop import train

        cfg, _ = parse_run_config(argv, TRAIN_FLAGS, "train.py")
        train(cfg)

    return _run(go)


EVAL_FLAGS = {k: TRAIN_FLAGS[k] for k in ("model", "dtype", "splice", "task", "data_dir", "relations", "allowed_vocab",
                                          "max_seq_len", "eval_batch_size", "template", "output_dir")}


def evaluate_main(argv=None) -> int:
    """Evaluate an exported prompt table (no encoder) or the manual-template baseline."""

    def extra(p):
        p.add_argument("--prompt_table", help="directory with prompt_table.safetensors + .json")
        p.add_argument("--manual", action="store_true", help="evaluate the manual-template baseline")
        p.add_argument("--split", default="test", help="split to evaluate (default: test)")
        p.add_argument("--out", help="write the results as JSON here")

    def go():
        from ptuning_dist.evaluate import evaluate
        from ptuning_dist.model import PTuningModel
        from ptuning_dist.prompt.encoder import PromptTable
        from ptuning_dist.prompt.export import load_table
        from ptuning_dist.train.build import build_run, examples

        cfg, args = parse_run_config(argv, EVAL_FLAGS, "evaluate.py", extra)
        if bool(args.prompt_table) == bool(args.manual):
            raise PTuningError("evaluate.py: give exactly one of --prompt_table DIR or --manual")
        if args.prompt_table:
            # The table only fits the template it was trained with: take it from the sidecar.
            _, meta = load_table(args.prompt_table)
            if cfg.prompt.template not in (None, meta["template"]):
                raise PTuningError(f"--template {cfg.prompt.template!r} differs from the table's {meta['template']!r}")
            cfg.prompt.template = meta["template"]
        run = build_run(cfg)
        if args.prompt_table:
            table_MH, _ = load_table(args.prompt_table, backbone_hash=run.backbone_hash)
            model = PTuningModel(run.backbone, PromptTable(table_MH).to(run.device), _cands(run), cfg.model.splice)
        else:
            model = PTuningModel(run.backbone, None, _cands(run), cfg.model.splice)
        ex = examples(run, args.split, manual=args.manual)
        res = evaluate(model, ex, run.cands, cfg.train.eval_batch_size, run.tok.pad_id, run.device,
                       pack_to=cfg.pack_to)
        res["split"] = args.split
        text = json.dumps(res, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")

    return _run(go)


def _cands(run):
    t = run.cands.tensor()
    return None if t is None else t.to(run.device)


def export_main(argv=None) -> int:
    """Re-export the prompt table from a training output directory's encoder weights."""

    def go():
        from ptuning_dist.prompt.encoder import PromptEncoder
        from ptuning_dist.prompt.export import ENCODER_FILE, load_encoder, save_table
        from ptuning_dist.train.build import build_run

        p = argparse.ArgumentParser(prog="export.py", description=export_main.__doc__)
        p.add_argument("--run_dir", required=True, help="a training --output_dir (run_config.json, encoder.safetensors)")
        p.add_argument("--out", help="output directory (default: <run_dir>/prompt_table)")
        args = p.parse_args(argv)
        run_dir = Path(args.run_dir)
        cfg = from_dict(load_file(run_dir / "run_config.json"))
        # one process reads the backbone for its hidden size and fingerprint: however the run was
        # parallelised (megatron TP/PP, ZeRO), the HF model at the same path is the same backbone
        cfg.model.backend, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ds_config = "hf", 1, 1, None
        run = build_run(cfg, device=None)
        enc = PromptEncoder(cfg.prompt.encoder, run.template.n_prompt, run.backbone.hidden_size)
        load_encoder(run_dir / ENCODER_FILE, enc)
        out = save_table(args.out or run_dir / "prompt_table", enc.export_table(), template=run.template.text,
                         backbone_path=str(run.model_path), backbone_hash=run.backbone_hash,
                         tokenizer=str(run.model_path), vocab_size=run.tok.vocab_size,
                         extra={"task": cfg.data.task, "encoder": cfg.prompt.encoder})
        print(f"prompt table -> {out}")

    return _run(go)
