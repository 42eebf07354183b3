"""One run per output directory: ``<output_dir>/run.lock`` (host, pid, start time), taken by rank 0
before anything else is written there, held until the run ends.

Two runs on one directory would overwrite each other's metrics, checkpoints and table and both exit
0. So a second run on a live directory stops with an error naming the holder. A lock is stale, and
taken over with a warning, when its holder is a dead pid on this host, or when it has not been
refreshed for ``STALE_AFTER_S`` (the holder touches it every ``HEARTBEAT_S`` from a thread: a run
whose node died does not block another run for long), or when it is an earlier incarnation of this
same Slurm job (same ``SLURM_JOB_ID``, a lower ``SLURM_RESTART_COUNT``: the job was requeued, so its
previous run is over, wherever it ran).

The lock also makes a failed start leave nothing behind: ``abandon()`` (bad input found during
set-up) removes the directory when this run made it, else only the lock and what ``made()``
recorded (the embedded default backbone's copy).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from ptuning_dist.errors import ConfigError

LOCK_FILE = "run.lock"
HEARTBEAT_S, STALE_AFTER_S = 30.0, 300.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


class RunLock:
    def __init__(self, out: Path):
        self.out, self.path = Path(out), Path(out) / LOCK_FILE
        self.created_dir, self.held, self._made = False, False, []
        self._stop = threading.Event()

    def acquire(self, say) -> None:
        """Take the lock (making ``out``), or raise a ConfigError naming the run that holds it."""
        self.created_dir = not self.out.exists()
        self.top = self.out  # the outermost directory this run makes (abandon removes it)
        while not self.top.parent.exists():
            self.top = self.top.parent
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.output_dir: cannot make {self.out} ({e.strerror})") from None
        if not self.out.is_dir():
            raise ConfigError(f"train.output_dir: {self.out} is not a directory")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": _restart_count()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(say)
                continue
            except OSError as e:
                raise ConfigError(f"train.output_dir: cannot write {self.path} ({e.strerror})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            threading.Thread(target=self._heartbeat, name="run.lock heartbeat", daemon=True).start()
            return
        raise ConfigError(f"train.output_dir: {self.path} was taken by another run while this one started")

    def _take_over_if_stale(self, say) -> None:
        try:
            holder = json.loads(self.path.read_text())
            host, pid, started = holder["host"], int(holder["pid"]), holder["started"]
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"train.output_dir: {self.path} is not a lock this program wrote; if no run uses "
                              f"{self.out}, delete it") from None
        dead = host == socket.gethostname() and not _alive(pid)
        job = os.environ.get("SLURM_JOB_ID")
        requeued = job is not None and holder.get("slurm_job") == job and \
            isinstance(holder.get("slurm_restart"), int) and holder["slurm_restart"] < _restart_count()
        if not dead and not requeued and age < STALE_AFTER_S:
            raise ConfigError(f"train.output_dir: {self.out} is in use by the run of pid {pid} on {host} (started "
                              f"{started}, {self.path}); wait for it to end or give another --output_dir")
        why = (f"pid {pid} is not running" if dead else f"Slurm job {job} was requeued" if requeued
               else f"not refreshed for {age:.0f} s")
        say(f"warning: taking over the stale lock {self.path} of pid {pid} on {host} ({why})")
        self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def made(self, path: Path) -> None:
        """Record something this run created in ``out`` (removed by ``abandon``)."""
        self._made.append(Path(path))

    def release(self) -> None:
        self._stop.set()
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def abandon(self) -> None:
        """A start that failed on bad input: leave ``out`` as it was before this run."""
        if not self.held:
            return
        self.release()
        if self.created_dir:
            shutil.rmtree(self.top, ignore_errors=True)
            return
        for p in self._made:
            shutil.rmtree(p, ignore_errors=True)
