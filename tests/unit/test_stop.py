"""Stopping on request (train/stop.py) and srun rank discovery (parallel/launch.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptuning_dist.errors import ConfigError
from ptuning_dist.parallel import launch
from ptuning_dist.train.stop import StopWatch

ROOT = Path(__file__).resolve().parents[2]
SLURM_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID",
              "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_JOB_ID",
              "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


@pytest.fixture
def slurm_env(monkeypatch, tmp_path):
    """A clean environment plus a fake `scontrol` on PATH that prints two hosts."""
    for v in SLURM_VARS:
        monkeypatch.delenv(v, raising=False)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "nodeA\\nnodeB\\n"\n')
    (fake / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    return monkeypatch


def test_srun_task_discovers_rank_world_and_master(slurm_env):
    slurm_env.setenv("SLURM_PROCID", "3")
    slurm_env.setenv("SLURM_LOCALID", "1")
    slurm_env.setenv("SLURM_STEP_NUM_TASKS", "4")
    slurm_env.setenv("SLURM_NTASKS", "4")
    slurm_env.setenv("SLURM_JOB_NODELIST", "node[A-B]")
    slurm_env.setenv("SLURM_JOB_ID", "123456")
    assert launch.launched_by_srun() and launch.env_world() == (3, 4)
    assert launch._srun_env() == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "nodeA",
                                  "MASTER_PORT": str(20000 + 123456 % 20000)}
    slurm_env.setenv("MASTER_ADDR", "10.0.0.7")  # the batch script's choice wins
    slurm_env.setenv("MASTER_PORT", "29999")
    kept = launch._srun_env()  # only what is missing is filled in
    assert "MASTER_ADDR" not in kept and "MASTER_PORT" not in kept


def test_batch_script_itself_is_a_world_of_one(slurm_env):
    """sbatch sets SLURM_PROCID and SLURM_NTASKS for the batch shell too, but no STEP variable: a plain
    `python launchers/train.py` there must not wait for 8 ranks that never come."""
    slurm_env.setenv("SLURM_PROCID", "0")
    slurm_env.setenv("SLURM_NTASKS", "8")
    assert not launch.launched_by_srun() and launch.env_world() == (0, 1)


def test_srun_without_master_or_nodelist_names_what_is_missing(slurm_env):
    slurm_env.setenv("SLURM_PROCID", "0")
    slurm_env.setenv("SLURM_STEP_NUM_TASKS", "2")
    with pytest.raises(ConfigError, match="neither MASTER_ADDR nor SLURM_JOB_NODELIST"):
        launch._srun_env()
    slurm_env.setenv("SLURM_JOB_NODELIST", "n1")
    slurm_env.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="export MASTER_ADDR in the batch script"):
        launch._srun_env()


def test_stop_watch_signals_file_and_restore(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    with StopWatch(tmp_path) as stop:
        assert stop.local() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.local() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
    with StopWatch(tmp_path) as stop:
        (tmp_path / "STOP").touch()
        assert "STOP exists" in stop.local()


def test_repeated_signal_ignored_at_once_kills_later(tmp_path):
    """The same SIGTERM twice in a row (Slurm to the worker, then torchrun's forwarded copy) is one
    request; asked again after REPEAT_KILLS_AFTER_S, the process dies at once."""
    code = ("import os, signal, time, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from ptuning_dist.train import stop\n"
            "stop.REPEAT_KILLS_AFTER_S = 0.5\n"
            "with stop.StopWatch('.') as s:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
            "    print(s.local(), 'survived', flush=True)\n"
            "    time.sleep(0.6); os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('survived again')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.stdout.strip() == "SIGTERM survived" and res.returncode == -signal.SIGTERM, (res.stdout, res.stderr)


def test_stale_stop_file_removed_fresh_one_kept(tmp_path):
    stale = tmp_path / "STOP"
    stale.touch()
    os.utime(stale, (time.time() - 60, time.time() - 60))
    (tmp_path / "STOPPED").write_text("3 SIGUSR1\n")
    said = []
    watch = StopWatch(tmp_path)
    watch.clear_stale_file(said.append)
    assert not stale.exists() and not (tmp_path / "STOPPED").exists() and said
    stale.touch()  # made after this process started: a real request
    watch.clear_stale_file(said.append)
    assert stale.exists() and watch.local()
