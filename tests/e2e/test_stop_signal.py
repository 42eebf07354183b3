"""A stop request (SIGUSR1) to one rank of a 2-rank ZeRO-3 run: every rank stops at the same step with
its checkpoint, and --resume auto continues bit-identically."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from distutil import ROOT

from ptuning_dist.parallel import launch
from ptuning_dist.train.stop import EXIT_STOPPED


def _pids_of(out: Path) -> dict[int, int]:
    """RANK -> pid of the training processes whose command line names ``out``."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if str(out).encode() in cmd and b"RANK" in env and any(c.endswith(b"train.py") for c in cmd):
            found[int(env[b"RANK"])] = int(proc.name)
    return found


def test_signal_to_one_rank_stops_all_with_a_checkpoint_then_resume_is_exact(backbone, tmp_path):
    """SIGUSR1 to rank 1 only: both ranks stop at the same log step, write its checkpoint and exit 99
    (the deepspeed launcher passes it on); --resume auto then gives the uninterrupted run's losses."""
    from distutil import env, losses

    flags = ["--model", backbone, "--ds_config", ROOT / "ds_configs" / "zero3.json", "--max_steps", 8,
             "--micro_batch_size", 4, "--global_batch_size", 8, "--log_every", 1, "--save_every", 100]
    train = ROOT / "launchers" / "train.py"
    full, cut = tmp_path / "full", tmp_path / "cut"
    ds = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
          str(launch.free_port()), str(train)]
    subprocess.run([*ds, *map(str, flags), "--output_dir", str(full)], env=env(), check=True, capture_output=True,
                   timeout=600, cwd=ROOT)
    ds[4] = str(launch.free_port())
    p = subprocess.Popen([*ds, *map(str, flags), "--output_dir", str(cut)], env=env(), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    os.kill(_pids_of(cut)[1], signal.SIGUSR1)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == EXIT_STOPPED, out[-3000:]
    assert "stopped on request (another rank was asked to stop)" in out or "stopped on request (SIGUSR1)" in out
    stopped = len(losses(cut))
    assert 2 <= stopped < 8, out[-3000:]
    assert sorted(x.name for x in (cut / "checkpoints").iterdir()) == [f"step_{stopped:08d}"]
    assert (cut / "STOPPED").read_text().split()[0] == str(stopped)  # for batch scripts behind torchrun
    p2 = subprocess.run([*ds, *map(str, flags), "--output_dir", str(cut), "--resume", "auto"], env=env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert losses(cut) == losses(full)
