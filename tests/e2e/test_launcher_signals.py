"""SIGTERM under the real launchers at 2 ranks (issue 16): to the job's whole process group (scancel)
through deepspeed and torchrun, and to the launcher process alone (srun forwards a signal to its
tasks: tests/e2e/test_slurm_jobs.py).
Each run goes through slurm/common.sh's ptd_run, the Slurm requeue path: the ranks must stop with
a checkpoint of their last step, rank 0 write STOPPED, the script exit 99, and no rank outlive it.

Measured (deepspeed 0.19.8, torch 2.13, CPU/gloo): deepspeed's runner has no handler and dies of
SIGTERM at once (-15) while launch.py and the ranks still checkpoint (launch.py then exits 1), so
ptd_run waits for what the runner left behind; the runner alone killed leaves launch.py and the
ranks training, until their parent watch (train/stop.py) stops them. torchrun's workers live in
their own sessions: a group SIGTERM reaches only the agent, which forwards it, waits for them and
exits 1; a SIGKILLed agent orphans them (the parent watch again)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from distutil import BIN, ROOT
from slurmutil import TINY, _kill_session, checkpoints, job_env, steps, wait_for

from ptuning_dist.parallel.launch import free_port
from ptuning_dist.train.stop import EXIT_STOPPED

MAX_STEPS = 5000  # never reached: the signal lands after the first logged step
TRAIN_ARGS = f"--max_steps {MAX_STEPS} --save_every 100000 {TINY}"
PTD_RUN = 'set -euo pipefail; source "$REPO_DIR/slurm/common.sh"; ptd_setup 2; ' \
          'ptd_run "$@" launchers/train.py "${PTD_TRAIN[@]}"'


def _launcher(name: str) -> list[str]:
    port = str(free_port())
    if name == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]


def _start(tmp: Path, backbone, launcher: str) -> subprocess.Popen:
    """The launcher under ptd_run in a batch-like shell (the leader of its own session and group)."""
    env = {k: v for k, v in job_env(tmp, nodes=1, per_node=2, MODEL=backbone, TRAIN_ARGS=TRAIN_ARGS,
                                    REPO_DIR=ROOT, PTD_STOP_WAIT_S=60).items() if not k.startswith("SLURM_")}
    return subprocess.Popen(["bash", "-c", PTD_RUN, "ptd", *_launcher(launcher)], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _procs() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process (not zombies: they have ended)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if state != "Z":
                    found[int(proc.name)] = (int(ppid), (proc / "cmdline").read_bytes())
            except (OSError, IndexError, ValueError):
                pass
    return found


def _ranks_of(out: Path) -> list[int]:
    """The training processes (python [-u] .../train.py ...) of the run writing to ``out``."""
    return [pid for pid, (_, cmd) in _procs().items() if str(out).encode() in cmd
            and any(a.endswith(b"train.py") for a in cmd.split(b"\0")[1:3])]


def _child_of(pid: int, marker: bytes) -> int:
    return next(p for p, (ppid, cmd) in _procs().items() if ppid == pid and marker in cmd)


def _first_step(p: subprocess.Popen, out: Path) -> None:
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text(), 300,
             "the first logged step", p)


def _end(p: subprocess.Popen, rank_pids: list[int], timeout: float = 120) -> tuple[str, dict]:
    """Wait for the job (its exit, not the end of its output, which a lingering rank still holds);
    its output and the ranks still running the moment it ended. Then nothing may outlive it: its
    session and the ranks (torchrun's workers sit outside it) are killed."""
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.append(p.stdout.read()), daemon=True)
    reader.start()
    try:
        p.wait(timeout)
        left = {pid: _procs()[pid] for pid in set(rank_pids) & set(_procs())}
    except subprocess.TimeoutExpired:
        left = None
    finally:
        _kill_session(p.pid)
        for pid in rank_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    reader.join(30)
    assert left is not None, f"the job did not end within {timeout} s:\n{''.join(log)[-4000:]}"
    return "".join(log), left


def _assert_stopped_with_checkpoint(p: subprocess.Popen, out: Path, log: str, rank_pids: list[int],
                                    left: dict) -> int:
    assert p.returncode == EXIT_STOPPED, log[-4000:]
    stopped = steps(out)[-1]
    assert 1 <= stopped < MAX_STEPS and checkpoints(out) == [f"step_{stopped:08d}"], log[-4000:]
    assert (out / "STOPPED").read_text().split()[0] == str(stopped), log[-4000:]
    assert log.count(f"after step {stopped}; the checkpoint of step {stopped} is written") == 2, log[-4000:]
    assert len(rank_pids) == 2 and not left, f"ranks outlived the job: {left}"
    return stopped


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])  # srun: test_slurm_jobs.py (it forwards to its tasks)
def test_sigterm_to_the_job_group_stops_with_a_checkpoint_and_exit_99(backbone, tmp_path, launcher):
    """scancel: SIGTERM to the job's process group: the batch shell (it makes STOP), the launcher and
    deepspeed's ranks. torchrun's workers sit in sessions of their own: the signal reaches only the
    agent (the same as signalling it alone), which forwards it."""
    out = tmp_path / "out"
    p = _start(tmp_path, backbone, launcher)
    _first_step(p, out)
    rank_pids = _ranks_of(out)
    os.killpg(p.pid, signal.SIGTERM)
    log, left = _end(p, rank_pids)
    _assert_stopped_with_checkpoint(p, out, log, rank_pids, left)
    assert "got SIGTERM" in log and "not requeued" in log, log[-4000:]  # SIGTERM: the user's stop
    if launcher == "deepspeed":  # the runner died at once; ptd_run waited for launch.py and the ranks
        assert "the launcher exited 143 but processes it started still run" in log, log[-4000:]
    if launcher == "torchrun":  # it forwards, waits for its workers, then exits 1
        assert "Received 15 death signal, shutting down workers" in log and "exited 1;" in log, log[-4000:]


@pytest.mark.parametrize("launcher,sig", [("deepspeed", signal.SIGTERM), ("torchrun", signal.SIGKILL)],
                         ids=["deepspeed-runner-term", "torchrun-agent-kill"])
def test_launcher_alone_signalled_the_ranks_still_stop_with_a_checkpoint(backbone, tmp_path, launcher, sig):
    """Only the launcher process gets the signal (not the batch shell, so no STOP file): deepspeed's
    runner dies of SIGTERM without a word to launch.py; a SIGKILLed torchrun agent cannot forward
    anything (a SIGTERM it forwards: the group test). The ranks notice (stop.py's parent watch) and
    stop after a checkpoint; ptd_run waits for them and exits 99."""
    out = tmp_path / "out"
    p = _start(tmp_path, backbone, launcher)
    _first_step(p, out)
    rank_pids = _ranks_of(out)
    os.kill(_child_of(p.pid, b"deepspeed" if launcher == "deepspeed" else b"torch.distributed.run"), sig)
    log, left = _end(p, rank_pids)
    _assert_stopped_with_checkpoint(p, out, log, rank_pids, left)
    assert "got SIGTERM" not in log and "the launcher (pid" in log, log[-4000:]
    assert f"the launcher exited {128 + sig} but processes it started still run" in log, log[-4000:]


def test_parent_watch_sets_the_reason_when_the_launcher_dies(tmp_path):
    """The watch alone, in a process whose parent is SIGKILLed (no torch collective): the reason is
    set within about WATCH_EVERY_S; without LOCAL_RANK (a plain or nohup'd python) nothing is watched."""
    code = ("import os, sys, time\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from ptuning_dist.train.stop import WATCH_EVERY_S, StopWatch\n"
            "with StopWatch('.') as s:\n"
            "    parent = os.getppid(); open('ready', 'w').close()\n"
            "    while os.getppid() == parent: time.sleep(0.05)\n"
            "    t = time.monotonic()\n"
            "    while not s.local() and time.monotonic() - t < 3 * WATCH_EVERY_S: time.sleep(0.05)\n"
            "    open('reason', 'w').write(str(s.local()))\n")
    runs = {}
    for local_rank in ("0", None):  # both at once: each pays a torch import
        d = tmp_path / f"local_rank_{local_rank}"
        d.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
        if local_rank is not None:
            env["LOCAL_RANK"] = local_rank
        runs[d] = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                    f"subprocess.Popen([sys.executable, '-c', {code!r}]); time.sleep(120)"],
                                   cwd=d, env=env, start_new_session=True)
    try:
        for d in runs:
            wait_for(lambda: (d / "ready").exists(), 60, "the child in its StopWatch")
    finally:
        for parent in runs.values():
            parent.kill()
            parent.wait()
    for d in runs:
        wait_for(lambda: (d / "reason").exists(), 30, "the child's verdict")
    assert [(d / "reason").read_text().split(" (pid")[0] for d in runs] == ["the launcher", "None"]
