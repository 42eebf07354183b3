"""What every entry point shares: quiet libraries, and one way to end (exit codes and errors)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from ptuning_dist.errors import PTuningError

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error: ...`` line and exit 2 like every other bad input
    (argparse's own prints the usage first)."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def quiet_libraries() -> None:
    from ptuning_dist.compat.build_lock import use_interpreter_ninja

    use_interpreter_ninja()  # before DeepSpeed builds its comm op: one ninja for every process
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


def run(fn, quiet: bool = True) -> int:
    """Exit status of ``fn()``: 0; 2 with one ``error: ...`` line for bad input (a PTuningError);
    ``EXIT_STOPPED`` (99) after a stop on request, its checkpoint written."""
    from ptuning_dist.train.stop import EXIT_STOPPED, StopRequested

    if quiet:
        quiet_libraries()
    try:
        fn()
    except PTuningError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StopRequested as e:  # preempted / asked to stop: the checkpoint is written, requeue and resume
        print(str(e), file=sys.stderr)
        return EXIT_STOPPED
    return 0
