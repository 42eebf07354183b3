"""2-rank gloo runs under the real launchers and DeepSpeed, against a single-process reference."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from distutil import (BIN, COMMON, LLAMA_RTE, ROOT, WORKER, assert_matches_reference, assert_partitions_predicted,
                      losses, run, torchrun)

from ptuning_dist.backbone.tiny import default_backbone
from ptuning_dist.parallel.launch import free_port
from ptuning_dist.train.checkpoint import read_state


@pytest.fixture(scope="module")
def zero3(backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("z3")
    torchrun(2, WORKER, "--record", out / "rec", "--model", backbone, "--output_dir", out,
             "--ds_config", ROOT / "ds_configs" / "zero3.json", *COMMON)
    return out


def test_zero3_matches_single_process(reference, zero3):
    a, b = losses(reference), losses(zero3)
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    ref = torch.load(reference / "rec" / "rank0.pt")
    for r in (0, 1):
        rec = torch.load(zero3 / "rec" / f"rank{r}.pt")
        for step in (1, 3):
            for name, g in ref["grads"][step].items():
                torch.testing.assert_close(rec["grads"][step][name], g, atol=1e-5, rtol=1e-4, msg=f"{step} {name}")


def test_zero3_partitions_backbone_and_replicates_encoder(zero3):
    r0, r1 = (torch.load(zero3 / "rec" / f"rank{r}.pt") for r in (0, 1))
    assert r0["partitions"], "no frozen parameters recorded"
    for name, full, local in r0["partitions"]:
        assert local == -(-full // 2), f"{name}: {local} of {full} elements on rank 0, expected numel/2"
    # loaded shard-wise: each rank read exactly the elements of its partitions (no gather, no broadcast)
    for r, rec in enumerate((r0, r1)):
        own = sum(max(0, min(local, full - r * local)) for _, full, local in rec["partitions"])
        assert rec["load_report"]["bytes_read"] == 4 * own, (r, rec["load_report"], own)
    assert r0["trainable"] == r0["encoder_numel"] > 0
    assert r0["materialised"][1] == r0["materialised"][3] == {}, "ZeRO-3 left parameters gathered after a step"
    # the splice's table (tied: also the head) is gathered once per step, not once per micro-batch
    # forward (2 micro-batches per rank and step here)
    for r, rec in enumerate((r0, r1)):
        assert sorted(rec["gathers"]) == [1, 2, 3], rec["gathers"]
        for step, counts in rec["gathers"].items():
            assert counts and set(counts.values()) == {1}, (r, step, counts)
            assert any("wte" in n for n in counts), counts
    for k in r0["encoder_init"]:
        assert torch.equal(r0["encoder_init"][k], r1["encoder_init"][k])
        assert torch.equal(r0["params"][3][k], r1["params"][3][k]), f"encoder replicas diverged at {k}"
        assert torch.equal(r0["grads"][3][k], r1["grads"][3][k])


def test_zero3_gather_per_step_bit_identical_and_released(backbone, zero3, tmp_path):
    """parallel.zero3_gather: 'step' (what auto picks for this small model: ``zero3``) gathers every
    frozen weight once per step and keeps it across the step's forwards and backwards; 'layer' is
    DeepSpeed's per-module gather for every forward and backward. The same bits either way; after
    a step both leave nothing gathered and every weight at numel/DP."""
    torchrun(2, WORKER, "--record", tmp_path / "rec", "--model", backbone, "--output_dir", tmp_path,
             "--ds_config", ROOT / "ds_configs" / "zero3.json", "--zero3_gather", "layer", *COMMON)
    assert losses(tmp_path) == losses(zero3)
    for r in (0, 1):
        step, layer = torch.load(zero3 / "rec" / f"rank{r}.pt"), torch.load(tmp_path / "rec" / f"rank{r}.pt")
        for k, g in layer["grads"][3].items():
            assert torch.equal(step["grads"][3][k], g), k
        for rec in (step, layer):
            assert rec["materialised"][1] == rec["materialised"][3] == {}, "left gathered after a step"
            assert all(local == -(-full // 2) for _, full, local in rec["partitions"])
        # 'step': each frozen weight gathered (and released) exactly once per step; 'layer': the
        # layers' weights once per forward and once per backward of each of the 2 micro-batches
        assert set(step["all_gathers"].values()) == {step["frozen_count"]}, step["all_gathers"]
        assert min(layer["all_gathers"].values()) > 3 * layer["frozen_count"], layer["all_gathers"]


def test_activation_checkpointing_bit_identical(backbone, zero3, tmp_path):
    torchrun(2, WORKER, "--record", tmp_path / "rec", "--model", backbone, "--output_dir", tmp_path,
             "--ds_config", ROOT / "ds_configs" / "zero3.json", "--activation_checkpointing", "true", *COMMON)
    assert losses(tmp_path) == losses(zero3)
    on, off = torch.load(tmp_path / "rec" / "rank0.pt"), torch.load(zero3 / "rec" / "rank0.pt")
    for k, g in off["grads"][3].items():
        assert torch.equal(on["grads"][3][k], g), k


@pytest.mark.parametrize("config", ["zero0.json", "zero3_offload.json"])
def test_other_ds_configs_match_reference(backbone, reference, tmp_path, config):
    torchrun(2, WORKER, "--record", tmp_path / "rec", "--model", backbone, "--output_dir", tmp_path,
             "--ds_config", ROOT / "ds_configs" / config, *COMMON)
    a, b = losses(reference), losses(tmp_path)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


def test_killed_run_and_killed_save_resume_bit_identical(backbone, tmp_path):
    # 2 epochs of the 48 training rows in global batches of 16 on 2 ranks: 6 steps of the global stream
    flags = ["--model", backbone, "--ds_config", ROOT / "ds_configs" / "zero3.json", "--epochs", 2,
             "--micro_batch_size", 4, "--global_batch_size", 16, "--log_every", 1, "--save_every", 3]
    train = ROOT / "launchers" / "train.py"
    full = tmp_path / "full"
    torchrun(2, train, *flags, "--output_dir", full)
    # rank 0 dies inside the step-6 save, after writing the state into step_6.tmp, before the rename
    cut = tmp_path / "cut"
    p = torchrun(2, train, *flags, "--output_dir", cut, ok=False, extra_env={"PTUNING_FAULT": "0:save:6"})
    assert p.returncode != 0
    ckpts = sorted(x.name for x in (cut / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006.tmp"], ckpts
    p = torchrun(2, train, *flags, "--output_dir", cut, "--resume", "auto")
    assert losses(cut) == losses(full)  # steps 1-3 from the first run, 4-6 resumed: bit-identical
    assert "resumed from" in p.stdout + p.stderr and "step_00000003" in p.stdout + p.stderr
    # the checkpoint holds only what trains: the encoder and AdamW's two moments (+ a step count
    # per tensor), no backbone tensor at any size of backbone
    state = read_state(full / "checkpoints" / "step_00000006")
    n_enc = sum(v.numel() for v in state["encoder"].values())
    n_opt = sum(v.numel() for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v))
    assert n_opt == 2 * n_enc + len(state["encoder"])
    assert set(state) == {"step", "samples", "stream", "groups", "selection", "encoder", "optimizer", "scheduler",
                          "rng", "run_config"}
    assert state["groups"] == ["P36", "P37"]  # one prompt per relation of the default task
    assert len(state["rng"]) == 2 and state["samples"] == 6 * 16
    assert json.loads((full / "run_config.json").read_text())["train"]["max_steps"] == 6


def test_resume_on_one_rank_and_refusals(backbone, tmp_path):
    flags = ["--model", backbone, "--max_steps", 4, "--micro_batch_size", 4, "--global_batch_size", 16,
             "--log_every", 1, "--save_every", 2]
    train = ROOT / "launchers" / "train.py"
    two = tmp_path / "two"
    torchrun(2, train, *flags, "--ds_config", ROOT / "ds_configs" / "zero3.json", "--output_dir", two)
    one = tmp_path / "one"
    shutil.copytree(two / "checkpoints", one / "checkpoints")
    shutil.rmtree(one / "checkpoints" / "step_00000004")
    p = run([sys.executable, train, *flags, "--output_dir", one, "--resume", "auto"])
    assert "resuming a 2-rank checkpoint on 1 ranks" in p.stdout
    a, b = losses(two)[2:], losses(one)
    assert len(b) == 2 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    # a corrupt newest checkpoint: 'auto' skips it, an explicit path is refused
    state = two / "checkpoints" / "step_00000004" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-10])
    p = run([sys.executable, train, *flags, "--output_dir", two, "--resume", two / "checkpoints" / "step_00000004"],
            ok=False)
    assert p.returncode == 2 and "SHA-256 does not match" in p.stderr
    p = run([sys.executable, train, *flags, "--output_dir", two, "--resume", "auto"])
    assert "skipping checkpoint" in p.stdout and "step_00000002" in p.stdout
    # a checkpoint of another backbone is refused
    other = default_backbone(tmp_path / "other_parent" / "b")
    from safetensors.torch import load_file, save_file
    w = load_file(str(other / "model.safetensors"))
    k = next(iter(w))
    w[k] = w[k] + 1
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    p = run([sys.executable, train, *flags[2:], "--model", other, "--output_dir", two, "--resume",
             two / "checkpoints" / "step_00000002"], ok=False)
    assert p.returncode == 2 and "belongs to backbone" in p.stderr


def test_dead_rank_stops_the_others(backbone, tmp_path):
    t0 = time.monotonic()
    p = torchrun(2, ROOT / "launchers" / "train.py", "--model", backbone, "--output_dir", tmp_path,
                 "--ds_config", ROOT / "ds_configs" / "zero3.json", "--max_steps", 50, "--micro_batch_size", 8,
                 "--dist_timeout_s", 60, ok=False, extra_env={"PTUNING_FAULT": "1:step:3"})
    assert p.returncode != 0
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "checkpoints").exists()


def test_nonfinite_loss_stops_without_checkpoint(tmp_path):
    bad = default_backbone(tmp_path / "bad")
    from safetensors.torch import load_file, save_file
    w = load_file(str(bad / "model.safetensors"))
    key = next(k for k in w if "ln_f.weight" in k)
    w[key] = torch.full_like(w[key], float("inf"))
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    p = run([sys.executable, ROOT / "launchers" / "train.py", "--model", bad, "--output_dir", tmp_path / "o",
             "--max_steps", 5, "--save_every", 1, "--log_every", 5], ok=False)
    assert p.returncode != 0 and "non-finite loss at step 1" in p.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_deepspeed_shm_buffers_unlinked_and_still_used(tmp_path):
    port = free_port()
    run([BIN / "deepspeed", "--num_gpus", 2, "--master_port", port, ROOT / "tests" / "workers" / "shm_worker.py"],
        extra_env={"MASTER_PORT": str(port)})
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_zero3_bf16_backbone_fp32_encoder(backbone, reference, tmp_path):
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["bf16"] = {"enabled": True}
    (tmp_path / "bf16.json").write_text(json.dumps(ds))
    torchrun(2, WORKER, "--record", tmp_path / "rec", "--model", backbone, "--output_dir", tmp_path,
             "--ds_config", tmp_path / "bf16.json", *COMMON)
    rec = torch.load(tmp_path / "rec" / "rank0.pt")
    assert all(g.dtype == torch.float32 for g in rec["grads"][1].values())
    a, b = losses(reference), losses(tmp_path)
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05, (a, b)  # bf16 rounding, not a different model
    assert json.loads((tmp_path / "run_config.json").read_text())["model"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("world", [2, 4])  # TP=2 x DP=1, TP=2 x DP=2
def test_tensor_parallel_megatron_matches_single_process(backbone, reference, tmp_path, world):
    """TP=2 on the megatron backbone (vocabulary 147 padded to 256) against the HF single process;
    the two TP replicas must hold identical encoder gradients without any all-reduce between them."""
    torchrun(world, WORKER, "--record", tmp_path / "rec", "--model", backbone, "--output_dir", tmp_path,
             "--backend", "megatron", "--tp", 2, *COMMON)
    a, b = losses(reference), losses(tmp_path)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    ref = torch.load(reference / "rec" / "rank0.pt")
    r0, r1 = (torch.load(tmp_path / "rec" / f"rank{r}.pt") for r in (0, 1))
    for step in (1, 3):
        for name, g in ref["grads"][step].items():
            torch.testing.assert_close(r0["grads"][step][name], g, atol=1e-5, rtol=1e-4, msg=f"{step} {name}")
            assert torch.equal(r0["grads"][step][name], r1["grads"][step][name]), f"TP replicas differ: {name}"
    assert r0["trainable"] == r0["encoder_numel"]
    assert_partitions_predicted(tmp_path, backbone, world, tp=2)


@pytest.mark.parametrize("backend,world,layout", [("hf", 2, []), ("megatron", 4, ["--tp", 2]), ("megatron", 4, ["--pp", 2])],
                         ids=["hf-dp2", "tp2xdp2", "pp2xdp2"])
def test_fsdp2_partitions_over_dp_and_matches(backbone, reference, tmp_path, backend, world, layout):
    torchrun(world, WORKER, "--record", tmp_path / "rec", "--model", backbone, "--output_dir", tmp_path,
             "--backend", backend, *layout, "--fsdp2", "true", *COMMON)
    a, b = losses(reference), losses(tmp_path)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    ref = torch.load(reference / "rec" / "rank0.pt")
    r0 = torch.load(tmp_path / "rec" / "rank0.pt")
    for name, g in ref["grads"][3].items():
        torch.testing.assert_close(r0["grads"][3][name], g, atol=1e-5, rtol=1e-4, msg=name)
    for r in range(world):  # every stage's shard
        rec = torch.load(tmp_path / "rec" / f"rank{r}.pt")
        for name, full, local in rec["partitions"]:
            assert local < full or full == 1, f"{name}: {local} of {full} elements on rank {r}, not sharded"
            assert local <= -(-full // 2) + full // 2 ** 6, f"{name}: {local} of {full}"  # ~half, dim-0 rounding
        assert rec["not_dtensor"][1] == rec["not_dtensor"][3] == 0, f"rank {r}: FSDP2 left parameters gathered"
        if backend == "hf":  # filled shard-wise: each rank read exactly its own rows of every tensor
            assert rec["load_report"]["bytes_read"] == 4 * sum(local for _, _, local in rec["partitions"]), r
    if backend == "megatron":
        tp, pp = (2, 1) if layout[0] == "--tp" else (1, 2)
        assert_partitions_predicted(tmp_path, backbone, world, tp, pp, "fsdp2")


def test_llama_tensor_parallel_training_matches_hf(family_dirs, llama_reference, tmp_path):
    """LLaMA (grouped-query attention, SwiGLU, RoPE) on RTE: TP=2 megatron against HF, one process."""
    torchrun(2, WORKER, "--record", tmp_path / "rec", "--output_dir", tmp_path, "--model", family_dirs["llama"],
             "--backend", "megatron", "--tp", 2, *LLAMA_RTE, *COMMON)
    assert_matches_reference(llama_reference, tmp_path, steps=(3,))
