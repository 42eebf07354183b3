"""Stopping early on request (preemption, a time limit): checkpoint, then exit with EXIT_STOPPED.

A job asks to stop by a signal to the training processes (SIGUSR1, e.g. Slurm's
``--signal=USR1@300``, or SIGTERM from ``scancel``/torchrun) or by creating ``<output_dir>/STOP``
(what the batch scripts in ``slurm/`` do when THEY get the signal: it reaches every rank under any
launcher, even through torchrun, which dies of a SIGUSR1 itself). A second identical signal kills
at once.

All ranks must stop at the same step (a rank that left would hang the others in a collective), so
the request is agreed on log and save steps only, with one all-reduce(MAX) over the world: those
steps already sync with the host, the others stay free of it. Stopping waits at most ``log_every``
steps; the checkpoint is written atomically like any other, and ``--resume auto`` continues from it
bit-identically.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_STOPPED = 99  # "stopped on request, checkpoint written: rerun with --resume auto" (the scripts requeue)
STOP_FILE = "STOP"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequested(Exception):
    """Raised out of the training loop after the stop checkpoint is written."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"stopped on request ({reason}) after step {step}; the checkpoint of step {step} is "
                         f"written: rerun with --resume auto to continue")
        self.step, self.reason = step, reason


class StopWatch:
    """Catches the stop signals while training (``with StopWatch(out) as stop:``), restores the
    previous handlers on exit. ``agreed(D)`` is the collective decision."""

    def __init__(self, out: Path):
        self.file = Path(out) / STOP_FILE
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopWatch":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason == name:  # asked twice: stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.reason = name

    def clear_stale_file(self, say) -> None:
        """Rank 0 at start: a STOP file left by the job that stopped must not stop its requeued run."""
        if self.file.exists():
            self.file.unlink()
            say(f"removed {self.file} (the stop request of an earlier run)")

    def local(self) -> str | None:
        if self.reason is None and self.file.exists():
            self.reason = f"{self.file} exists"
        return self.reason

    def agreed(self, D) -> bool:
        """True on every rank if any rank was asked to stop. A collective: log/save steps only."""
        flag = torch.tensor([1 if self.local() else 0], dtype=torch.int32, device=D.device)
        if D.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        asked = bool(flag.item())  # host sync: log and save steps only
        if asked and self.reason is None:
            self.reason = "another rank was asked to stop"
        return asked
