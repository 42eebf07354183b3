"""Stopping early on request (preemption, a time limit): checkpoint, then exit with EXIT_STOPPED.

A job asks to stop by a signal to the training processes (SIGUSR1, e.g. Slurm's
``--signal=USR1@300``, or SIGTERM from ``scancel``/torchrun) or by creating ``<output_dir>/STOP``
(what the batch scripts in ``slurm/`` do when THEY get the signal: it reaches every rank under any
launcher, even through torchrun, which dies of a SIGUSR1 itself). The same signal again more than
``REPEAT_KILLS_AFTER_S`` later kills at once (sooner it is taken for the same request delivered
twice: Slurm signals the workers and torchrun's agent forwards its own copy).

All ranks must stop at the same step (a rank that left would hang the others in a collective), so
the request is agreed on log and save steps only, with one all-reduce(MAX) over the world: those
steps already sync with the host, the others stay free of it. Stopping waits at most ``log_every``
steps; the checkpoint is written atomically like any other, and ``--resume auto`` continues from it
bit-identically. Rank 0 then writes ``<output_dir>/STOPPED`` (the step and the reason), so a batch
script can tell a stop from a crash whatever exit code its launcher reports (torchrun: 1).

A rank started by a launcher (``LOCAL_RANK`` set: torchrun, deepspeed) also stops so when that
launcher dies without stopping it: killing deepspeed's runner alone (its launch.py and ranks ran
on, orphaned) or a SIGKILLed torchrun agent (its workers sit in their own sessions). A daemon
thread checks every ``WATCH_EVERY_S`` that the parent links are intact (this rank's parent; under
deepspeed, also launch.py's parent, the runner) and only sets ``reason``. Not PR_SET_PDEATHSIG: it
fires when the forking *thread* exits and cannot see the runner above launch.py.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_STOPPED = 99  # "stopped on request, checkpoint written: rerun with --resume auto" (the scripts requeue)
STOP_FILE, STOPPED_FILE = "STOP", "STOPPED"
REPEAT_KILLS_AFTER_S = 10.0
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
WATCH_EVERY_S = 1.0


def _ppid(pid: int) -> int | None:
    """The parent of ``pid`` (None: no such process)."""
    if pid == os.getpid():
        return os.getppid()
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def launcher_links() -> list[tuple[int, int]]:
    """The (child, parent) links whose breaking means this rank's launcher is gone: none unless a
    launcher started this process (``LOCAL_RANK``: not a plain or nohup'd ``python``, nor srun's
    tasks, whose parent is slurmstepd); under deepspeed also launch.py -> the ``deepspeed`` runner."""
    parent = os.getppid()
    if "LOCAL_RANK" not in os.environ or parent <= 1:
        return []
    links = [(os.getpid(), parent)]
    try:
        launch_py = b"deepspeed.launcher.launch" in Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        launch_py = False
    runner = _ppid(parent) if launch_py else None
    if runner is not None and runner > 1:
        links.append((parent, runner))
    return links


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
        self._first_signal_at = 0.0
        self._started = time.time()
        self._done = threading.Event()

    def __enter__(self) -> "StopWatch":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        links = launcher_links()
        if links:
            threading.Thread(target=self._watch, args=(links,), name="ptd-launcher-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _watch(self, links: list[tuple[int, int]]) -> None:
        """Sets ``reason`` once a launcher in ``links`` is gone (its child was re-parented). No torch
        calls, no sync: the next log step's ``agreed`` picks the request up as it does a signal's."""
        while not self._done.wait(WATCH_EVERY_S):
            for child, parent in links:
                if _ppid(child) != parent:
                    if self.reason is None:
                        self.reason = f"the launcher (pid {parent}) is gone"
                    return

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason == name:
            if time.monotonic() - self._first_signal_at > REPEAT_KILLS_AFTER_S:  # asked again: stop now
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.reason, self._first_signal_at = name, time.monotonic()

    def clear_stale_file(self, say) -> None:
        """Rank 0 at start: a STOP file left by the run that stopped must not stop its requeued run;
        one made since this process started is a real request and stays. So does STOPPED go."""
        try:
            if self.file.stat().st_mtime < self._started - 2.0:  # margin: file times use a coarse clock
                self.file.unlink()
                say(f"removed {self.file} (the stop request of an earlier run)")
        except FileNotFoundError:
            pass
        (self.file.parent / STOPPED_FILE).unlink(missing_ok=True)

    def mark_stopped(self, step: int) -> None:
        """Rank 0, after the stop checkpoint: say so for the batch script."""
        tmp = self.file.parent / (STOPPED_FILE + ".tmp")
        tmp.write_text(f"{step} {self.reason}\n")
        tmp.replace(self.file.parent / STOPPED_FILE)

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
