"""``ptuning-train`` (``launchers/train.py``): P-tune a prompt encoder on a frozen backbone, then
evaluate and export its prompt table. Works the same under python, deepspeed, torchrun, mpirun and
srun; every flag sets one field of the run config (``ptuning_dist/config.py``)."""
from __future__ import annotations

import argparse

from ptuning_dist.cli import args as cli_args
from ptuning_dist.cli.common import Parser, run
from ptuning_dist.config import RunConfig

DESCRIPTION = ("P-tune a prompt encoder on a frozen backbone, then evaluate and export its prompt table "
               "(python, deepspeed, torchrun, mpirun or srun). Every flag sets one field of the run config.")


def parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    p = Parser(prog="ptuning-train", description=DESCRIPTION)
    dests = cli_args.add_run_config(p)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p, dests


def parse(argv=None) -> RunConfig:
    p, dests = parser()
    return cli_args.run_config(p.parse_args(argv), dests)


def main(argv=None) -> int:
    def go():
        from ptuning_dist.train.recipe import train

        train(parse(argv))

    return run(go)
