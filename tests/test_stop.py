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
from ptuning_dist.train.stop import EXIT_STOPPED, StopWatch

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.mark.slow
@pytest.mark.dist
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


@pytest.mark.dist
def test_mpirun_discovers_rank_world_and_local_rank(tmp_path):
    """mpirun (the PyPI mpich wheel's hydra): rank and world through mpi4py discovery, the local
    rank from MPI's own MPI_LOCALRANKID."""
    from distutil import env

    code = ("import sys; sys.path.insert(0, %r)\n"
            "from ptuning_dist.parallel import launch\n"
            "D = launch.init(need_group=True)\n"
            "import os, torch.distributed as dist\n"
            "open(f'%s/rank{D.rank}', 'w').write(f\"{D.rank} {D.world} {D.local_rank} {os.environ['MPI_LOCALRANKID']}\")\n"
            "dist.barrier(); dist.destroy_process_group()\n") % (str(ROOT), tmp_path)
    mpirun = Path(sys.executable).parent / "mpirun"
    res = subprocess.run([str(mpirun), "-np", "2", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**env(), "MASTER_PORT": str(launch.free_port())})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    seen = sorted(f.read_text() for f in tmp_path.glob("rank*"))  # files: the two ranks' stdout interleave
    assert seen == ["0 2 0 0", "1 2 1 1"], res.stdout
