"""One run per output directory, with real processes: a second run on a live directory is refused
naming the holder; the lock of a run killed with SIGKILL (dead pid) is taken over with a warning
(another host's lock: tests/unit/test_lock.py)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ptuning_dist.backbone.tiny import default_backbone

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train(model, out, *flags, **kw):
    cmd = [sys.executable, str(ROOT / "launchers" / "train.py"), "--model", str(model), "--output_dir", str(out),
           "--micro_batch_size", "4", *map(str, flags)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_two_runs_on_one_directory_and_a_stale_lock(tmp_path):
    model = default_backbone(tmp_path / "model")
    out = tmp_path / "out"
    a = train(model, out, "--max_steps", 100000, "--log_every", 50)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():  # A holds the lock and trains
            assert a.poll() is None and time.time() < deadline, a.communicate()
            time.sleep(0.5)
        b = train(model, out, "--max_steps", 2)
        _, err = b.communicate(timeout=120)
        assert b.returncode == 2, err
        lines = [x for x in err.splitlines() if "error" in x.lower()]
        assert len(lines) == 1 and f"in use by the run of pid {a.pid} on {socket.gethostname()}" in lines[0], err
        assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "run.lock", "run_config.json"]
    finally:
        a.send_signal(signal.SIGKILL)  # no clean-up: the lock stays behind with a dead pid
        a.wait()
    assert json.loads((out / "run.lock").read_text())["pid"] == a.pid
    c = train(model, out, "--max_steps", 2, "--log_every", 1)
    stdout, err = c.communicate(timeout=300)
    assert c.returncode == 0, err
    assert f"taking over the stale lock {out / 'run.lock'} of pid {a.pid}" in stdout + err
    assert not (out / "run.lock").exists()  # released at the end
