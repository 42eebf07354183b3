"""train.py under the real launchers at 2 ranks: deepspeed, torchrun and mpirun with ZeRO-3; megatron TP=2
and PP=2 runs that train, evaluate, export, checkpoint and resume a killed run exactly."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from distutil import BIN, ROOT, TRAIN, losses, run, torchrun

from ptuning_dist.parallel.launch import free_port
from ptuning_dist.train.checkpoint import read_state


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpirun"])
def test_launchers_run_two_ranks(backbone, tmp_path, launcher):
    script = [ROOT / "launchers" / "train.py", "--model", backbone, "--output_dir", tmp_path, "--max_steps", 4,
              "--ds_config", ROOT / "ds_configs" / "zero3.json", "--micro_batch_size", 8, "--log_every", 1]
    port = free_port()
    if launcher == "deepspeed":
        cmd = [BIN / "deepspeed", "--num_gpus", 2, "--master_port", port, *script]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", port, *script]
    else:
        cmd = [BIN / "mpirun", "-np", 2, sys.executable, *script]
    p = run(cmd, extra_env={"MASTER_PORT": str(port)})
    out = p.stdout + p.stderr
    assert out.count("ZeRO stage 3, dp 2") == 1, out[-3000:]  # rank 0 logs, rank 1 stays quiet
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # DeepSpeed's CPU comm op leaves a 66 MiB /dev/shm file per rank unless we unlink it (launch.py;
    # tests/workers/shm_worker.py shows the files are made and that the shm all-reduce works after unlinking)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.parametrize("layout", [["--tp", 2], ["--pp", 2]])
def test_launcher_model_parallel_checkpoint_and_exact_resume(backbone, tmp_path, layout):
    """train.py at TP=2 or PP=2: runs, evaluates, exports, checkpoints; a run killed after its
    step-3 checkpoint resumes to the same losses bit for bit."""
    flags = ["--model", backbone, "--backend", "megatron", *layout, "--max_steps", 6, "--micro_batch_size", 4,
             "--global_batch_size", 8, "--log_every", 1, "--save_every", 3]
    full = tmp_path / "full"
    torchrun(2, TRAIN, *flags, "--output_dir", full)
    assert (full / "prompt_table" / "prompt_table.safetensors").is_file() and (full / "eval.json").is_file()
    # export.py re-exports a megatron run's table in one plain process: the same table as training's
    run([sys.executable, ROOT / "launchers" / "export.py", "--run_dir", full, "--out", tmp_path / "re"])
    from ptuning_dist.prompt.export import load_table

    assert torch.equal(load_table(tmp_path / "re")[0], load_table(full / "prompt_table")[0])
    cut = tmp_path / "cut"
    p = torchrun(2, TRAIN, *flags, "--output_dir", cut, ok=False, extra_env={"PTUNING_FAULT": "1:step:5"})
    assert p.returncode != 0
    assert sorted(x.name for x in (cut / "checkpoints").iterdir()) == ["step_00000003"]
    p = torchrun(2, TRAIN, *flags, "--output_dir", cut, "--resume", "auto")
    assert "resumed from" in p.stdout + p.stderr
    assert losses(cut) == losses(full)
    state = read_state(full / "checkpoints" / "step_00000006")
    assert len(state["rng"]) == 2 and state["samples"] == 6 * 8


@pytest.mark.parametrize("layout", [["--backend", "megatron", "--tp", 2], ["--ds_config", ROOT / "ds_configs" / "zero3.json"]],
                         ids=["tp2", "zero3"])  # PP's predictions: pipeline.outputs, as every PP evaluation
def test_predict_on_two_ranks_equals_one_process(backbone, tmp_path, layout):
    """ptuning-predict through an exported table at TP=2 and ZeRO-3 DP=2: the predictions of
    one process, rank 0 writing the file."""
    run([sys.executable, TRAIN, "--model", backbone, "--output_dir", tmp_path / "run", "--max_steps", 4])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(open(ROOT / "ptuning_dist" / "data" / "bundled" / "lama_tiny" / r / "dev.jsonl").read()
                            for r in ("P36", "P37")))
    predict = ROOT / "launchers" / "predict.py"
    common = ["--model", backbone, "--prompt_table", tmp_path / "run" / "prompt_table", "--input", rows]
    run([sys.executable, predict, *common, "--out", tmp_path / "one.jsonl"])
    torchrun(2, predict, *common, *layout, "--out", tmp_path / "two.jsonl")
    one, two = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("one.jsonl", "two.jsonl"))
    assert [x["prediction"] for x in one] == [x["prediction"] for x in two] and len(one) == 16
    for a, b in zip(one, two):
        assert abs(a["logprob"] - b["logprob"]) < 1e-4, (a, b)
