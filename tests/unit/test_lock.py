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
