"""Running the Slurm batch scripts in slurm/ on this machine, as sbatch would (tests/unit/test_slurm_scripts.py,
tests/e2e/test_slurm_jobs.py).

Each script runs with ``bash`` (its #SBATCH lines are comments) in the environment sbatch would
give it for 2 "nodes" (127.0.0.1 and 127.0.0.2: both loopback), with tests/fake_slurm/ first on
PATH: a fake ``srun`` starts the tasks here with the per-task variables a real one sets, a fake
``scontrol`` expands host lists and logs ``requeue``. tests/fake_slurm/record_launch stands in for
python/torchrun where only the launch logic is checked; tests/fake_slurm/pyhook/sitecustomize.py
(on PYTHONPATH) has every real train.py process record the rank, world size and master it trained
with.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distutil import BIN, ROOT, env as dist_env


SLURM = ROOT / "slurm"


FAKE = ROOT / "tests" / "fake_slurm"


TRAIN_SCRIPTS = ("train_multinode.sbatch", "train_srun.sbatch", "train_single_node.sbatch")


SCRIPTS = (*TRAIN_SCRIPTS, "eval_export.sbatch")


NODES = "127.0.0.[1-2]"  # what `scontrol show hostnames` expands to 127.0.0.1 and 127.0.0.2


TINY = "--micro_batch_size 4 --global_batch_size 8 --log_every 1"


# variables a caller's shell (or a real Slurm job running pytest) could leak into the scripts
_SCRUB_PREFIXES = ("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "PMI_", "PMIX_", "OMPI_", "PET_", "TORCHELASTIC_")


_SCRUB = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "REPO_DIR", "OUTPUT_DIR", "MODEL",
          "CONFIG", "DS_CONFIG", "BACKEND", "TP", "PP", "TRAIN_ARGS", "GPUS_PER_NODE", "PYTHON", "TORCHRUN",
          "REQUEUE", "RUN_DIR", "EVAL_DIR", "EXPORT", "SPLIT", "MANUAL", "EVAL_ARGS", "FAKE_LAUNCH"}


def job_env(tmp: Path, nodes: int = 2, per_node: int = 1, job_id: int = 4242, **extra) -> dict[str, str]:
    """What sbatch gives a batch script of ``nodes`` x ``per_node`` tasks, plus the fakes and hooks."""
    e = {k: v for k, v in dist_env().items() if k not in _SCRUB and not k.startswith(_SCRUB_PREFIXES)}
    (tmp / "rec").mkdir(parents=True, exist_ok=True)
    e.update(
        PATH=f"{FAKE}:{BIN}:{e['PATH']}",
        PYTHONPATH=os.pathsep.join(p for p in (str(FAKE / "pyhook"), e.get("PYTHONPATH")) if p),
        SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="test", SLURM_JOB_NODELIST=NODES if nodes == 2 else "127.0.0.1",
        SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS=str(nodes * per_node),
        SLURM_NTASKS_PER_NODE=str(per_node), SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="1",
        FAKE_SLURM_LOG=str(tmp / "scontrol.log"), PTD_TEST_RECORD_DIR=str(tmp / "rec"),
        PYTHON=sys.executable, PTD_POLL_S="0.2", OUTPUT_DIR=str(tmp / "out"), MODEL="", DS_CONFIG="",
    )
    e.update({k: str(v) for k, v in extra.items()})
    return e


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session the test started (the batch shell and all it spawned)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of stat: the session id
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except OSError:
                    pass


def start_job(script: str, env: dict, tmp: Path) -> subprocess.Popen:
    # cwd: not the clone, so the scripts must find it (REPO_DIR from SLURM_SUBMIT_DIR)
    return subprocess.Popen(["bash", str(SLURM / script)], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(p.pid)
        out, _ = p.communicate()
        pytest.fail(f"the job did not end within {timeout} s:\n{out[-4000:]}")
    finally:
        _kill_session(p.pid)  # nothing of the job may outlive it
    return out


def run_job(script: str, env: dict, tmp: Path, timeout: float = 300) -> tuple[int, str]:
    p = start_job(script, env, tmp)
    out = finish(p, timeout)
    return p.returncode, out


def launches(tmp: Path) -> list[dict]:
    """What each record_launch process got: its arguments, variables, cwd, and whether STOP existed."""
    recs = []
    for f in sorted((tmp / "rec").glob("launch.*")):
        rec = {"args": [], "env": {}}
        for line in f.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "arg":
                rec["args"].append(value)
            elif key == "env":
                name, _, v = value.partition("=")
                rec["env"][name] = v
            else:
                rec[key] = value
        recs.append(rec)
    return recs


def ranks(tmp: Path) -> list[dict]:
    """What each real train.py process trained with (the sitecustomize hook), by rank."""
    return sorted((json.loads(f.read_text()) for f in (tmp / "rec").glob("rank.*.json")), key=lambda r: int(r["RANK"]))


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []


def wait_for(pred, timeout: float, what: str, p: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not pred():
        if p is not None and p.poll() is not None:
            pytest.fail(f"the job ended ({p.returncode}) before {what}:\n{p.stdout.read()[-4000:]}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
