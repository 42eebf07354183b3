"""Real 2-process training through each Slurm batch script (tests/slurmutil.py runs them as sbatch
would): ranks and masters, stop -> requeue -> resume, evaluation/export, and a bad layout failing fast."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from slurmutil import TINY, checkpoints, finish, job_env, ranks, run_job, start_job, steps, wait_for

from ptuning_dist.parallel.launch import free_port
from ptuning_dist.train.stop import EXIT_STOPPED


def test_bad_layout_fails_fast_with_exit_2(tmp_path):
    """tp x pp = 4 on a world of 2: every task refuses before any process group starts."""
    t0 = time.time()
    rc, out = run_job("train_srun.sbatch", job_env(tmp_path, MASTER_PORT=free_port(), BACKEND="megatron", TP=2,
                                                   PP=2, TRAIN_ARGS=f"--max_steps 2 {TINY}"), tmp_path)
    assert rc == 2, out
    assert "error: parallel.tp x parallel.pp = 2 x 2 = 4 does not divide the world size 2" in out
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


def test_multinode_job_trains(multinode_run):
    tmp, rc, out = multinode_run
    assert rc == 0, out[-4000:]
    seen = [(r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"], r["GROUP_RANK"], r["SLURM_NODEID"], r["MASTER_ADDR"],
             r["dist_rank"], r["dist_world"]) for r in ranks(tmp)]
    assert seen == [("0", "2", "0", "0", "0", "127.0.0.1", 0, 2), ("1", "2", "0", "1", "1", "127.0.0.1", 1, 2)], out
    assert steps(tmp / "out") == [1, 2, 3, 4]
    assert checkpoints(tmp / "out") == ["step_00000002", "step_00000004"]
    assert "ZeRO stage 3, dp 2" in out and (tmp / "out" / "prompt_table").is_dir()


def test_single_node_job_trains(tmp_path):
    env = job_env(tmp_path, nodes=1, GPUS_PER_NODE=2, TRAIN_ARGS=f"--max_steps 2 {TINY}")
    rc, out = run_job("train_single_node.sbatch", env, tmp_path)
    assert rc == 0, out[-4000:]
    seen = [(r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"], r["dist_world"]) for r in ranks(tmp_path)]
    assert seen == [("0", "2", "0", 2), ("1", "2", "1", 2)], out
    assert steps(tmp_path / "out") == [1, 2] and "dp 2" in out


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
