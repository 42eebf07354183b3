"""``ptuning-export`` (``launchers/export.py``): re-export the prompt table from a training output
directory's encoder weights, in one process, however the run was parallelised."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptuning_dist.cli import args as cli_args
from ptuning_dist.cli.common import Parser, run

DESCRIPTION = ("Re-export the prompt table from a training output directory's encoder weights, in one "
               "process.")


@dataclass
class ExportArgs:
    run_dir: str
    """A training --output_dir (it holds run_config.json and encoder.safetensors)."""
    out: str | None = None
    """The output directory (default: <run_dir>/prompt_table)."""


def main(argv=None) -> int:
    def go():
        from ptuning_dist.config import from_dict, load_file
        from ptuning_dist.prompt.export import ENCODER_FILE, load_encoder
        from ptuning_dist.train.evaluate import write_table
        from ptuning_dist.train.build import build_encoders, build_run

        p = Parser(prog="ptuning-export", description=DESCRIPTION)
        own = cli_args.add_fields(p, ExportArgs)
        args = cli_args.build(ExportArgs, p.parse_args(argv), own)
        run_dir = Path(args.run_dir)
        cfg = from_dict(load_file(run_dir / "run_config.json"))
        if cfg.model.path is None:  # the embedded default: the copy in the run directory, wherever it moved
            cfg.model.path = str(run_dir / "default_backbone")
        # one process, no weights read: the table needs the backbone's hidden size (config.json), its
        # fingerprint and tokenizer, however the run was parallelised and whatever the format
        run_ = build_run(cfg, device=None, load_backbone=False)
        enc = build_encoders(run_, cfg.train.seed)  # one per prompt group, as the run had them
        load_encoder(run_dir / ENCODER_FILE, enc)
        out = write_table(Path(args.out or run_dir / "prompt_table"), enc.export_table(), run_,
                          {"task": cfg.data.task, "encoder": cfg.prompt.encoder})
        print(f"prompt table -> {out}")

    return run(go)
