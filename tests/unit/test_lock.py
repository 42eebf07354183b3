"""The output-directory lock's rules without processes: another host's lock is refused while it is
refreshed and taken over once stale; a file that is not a lock is an error (tests/e2e/test_run_lock.py
runs two real trainings on one directory)."""
from __future__ import annotations

import json
import os
import time

import pytest

from ptuning_dist.errors import ConfigError
from ptuning_dist.train import lock as run_lock


def test_a_lock_from_another_host(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(ConfigError, match="in use by the run of pid 1 on node-elsewhere"):
        run_lock.RunLock(out).acquire(print)  # refreshed recently: its holder may be alive
    old = time.time() - run_lock.STALE_AFTER_S - 10
    os.utime(out / "run.lock", (old, old))
    said = []
    lock = run_lock.RunLock(out)
    lock.acquire(said.append)
    assert "not refreshed for" in said[0] and json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / "run.lock").exists()
    (out / "run.lock").write_text("garbage")
    with pytest.raises(ConfigError, match="not a lock this program wrote"):
        run_lock.RunLock(out).acquire(print)


def test_a_requeued_slurm_job_takes_its_earlier_lock(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"host": "node-a", "pid": 7, "started": "then", "slurm_job": "42",
                                              "slurm_restart": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same incarnation (another step of it): in use
    with pytest.raises(ConfigError, match="in use by the run of pid 7 on node-a"):
        run_lock.RunLock(out).acquire(print)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the earlier run is over, wherever it ran
    said = []
    lock = run_lock.RunLock(out)
    lock.acquire(said.append)
    assert "Slurm job 42 was requeued" in said[0]
    assert json.loads((out / "run.lock").read_text())["slurm_restart"] == 1
    lock.release()

