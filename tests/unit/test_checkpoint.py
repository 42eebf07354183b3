"""Checkpoints without pickle: the state round trip, bit-identical resume in one process, a crafted
pickle that never runs, corrupt trees, refusals (tokenizer, encoder, past max_steps), write failures
on a real full filesystem."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ptuning_dist.backbone.tiny import default_backbone
from ptuning_dist.config import from_dict
from ptuning_dist.errors import CheckpointError
from ptuning_dist.train import checkpoint as ckpt
from ptuning_dist.train import statefile
from ptuning_dist.train.recipe import lr_lambda, train

QUIET = {"log": lambda *a, **k: None}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return default_backbone(tmp_path_factory.mktemp("tiny") / "backbone")


def cfg_for(tiny_dir, out, **over):
    return from_dict({}, {"model.path": str(tiny_dir), "train.output_dir": str(out), "train.log_every": 1,
                          "train.micro_batch_size": 4, "train.max_steps": 4, "train.save_every": 2, **over})


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_state_round_trip_exact(tmp_path):
    enc = torch.nn.LSTM(4, 3)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    enc(torch.randn(2, 1, 4))[0].sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(from_dict({}, {"train.max_steps": 5})))
    state = {"step": 3, "rng": [ckpt.rng_state()], "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "selection": {"best": {"P36": 0.5}, "states": {"P36": {"w": torch.ones(2)}}, "stale": 0},
             "inf": float("inf"), "t": (1, "a", None), "$tensor": "a key that looks like a marker"}
    statefile.write(tmp_path, state)
    got = statefile.read(tmp_path)
    assert got["optimizer"]["state"].keys() == opt.state_dict()["state"].keys()  # int keys stay ints
    torch.testing.assert_close(got["optimizer"], opt.state_dict(), rtol=0, atol=0)
    assert got["scheduler"] == sched.state_dict() and got["t"] == (1, "a", None) and got["inf"] == float("inf")
    r, r0 = got["rng"][0], state["rng"][0]
    assert torch.equal(r["torch"], r0["torch"]) and r["python"] == r0["python"]
    assert r["numpy"][0] == r0["numpy"][0] and np.array_equal(r["numpy"][1], r0["numpy"][1])
    assert got["$tensor"] == state["$tensor"]
    ckpt.set_rng_state(r)  # what resume does with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]


def test_resume_bit_identical_and_refusals(tiny_dir, tmp_path):
    full = tmp_path / "full"
    train(cfg_for(tiny_dir, full), **QUIET)
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoints", cut / "checkpoints")
    shutil.rmtree(cut / "checkpoints" / "step_00000004")
    train(cfg_for(tiny_dir, cut, **{"train.resume": "auto"}), **QUIET)
    assert losses(cut) == losses(full)[2:]  # steps 3-4 resumed from step 2's checkpoint: bit-identical
    step2 = str(full / "checkpoints" / "step_00000002")
    with pytest.raises(CheckpointError, match="does not fit this run's"):
        train(cfg_for(tiny_dir, tmp_path / "o1", **{"train.resume": step2, "prompt.encoder": "mlp"}), **QUIET)
    with pytest.raises(CheckpointError, match=r"at step 4, past train.max_steps 3"):
        train(cfg_for(tiny_dir, tmp_path / "o2", **{"train.resume": str(full / "checkpoints" / "step_00000004"),
                                                     "train.max_steps": 3}), **QUIET)
    # the same backbone with its tokenizer's ids permuted: the checkpoint is refused, naming both
    other = tmp_path / "permuted"
    shutil.copytree(tiny_dir, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[10], list(vocab)[11]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CheckpointError, match=r"trained with the tokenizer of .*not this one \(.*permuted"):
        train(cfg_for(other, tmp_path / "o3", **{"train.resume": step2}), **QUIET)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file
        return (Path.touch, (Path(self.marker),))


def test_crafted_pickle_never_runs(tiny_dir, tmp_path):
    marker = tmp_path / "code_ran"
    out = tmp_path / "old"
    d = out / "checkpoints" / "step_00000002"
    d.mkdir(parents=True)
    (d / "state.pt").write_bytes(pickle.dumps({"step": 2, "x": _Evil(marker)}))
    meta = {"format": "ptuning_dist.checkpoint/1", "step": 2, "sha256": "0", "dp": 1,
            "backbone": {"path": str(tiny_dir), "fingerprint": "x"}}
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="pickled state.pt .* convert it once"):
        train(cfg_for(tiny_dir, out, **{"train.resume": str(d)}), **QUIET)
    assert not marker.exists()
    logs = []
    train(cfg_for(tiny_dir, out, **{"train.resume": "auto", "train.max_steps": 2}), log=logs.append)
    assert not marker.exists() and any("skipping checkpoint" in str(x) and "pickled" in str(x) for x in logs)


def test_corrupt_state_tree(tmp_path):
    statefile.write(tmp_path, {"a": torch.ones(2)})
    (tmp_path / "state.json").write_text(json.dumps({"a": {"$tensor": "t9"}}))
    with pytest.raises(CheckpointError, match="refers to a tensor 't9'"):
        statefile.read(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"a": {"$ndarray": [1], "dtype": "object"}}))
    with pytest.raises(CheckpointError, match=r"malformed \$ndarray"):
        statefile.read(tmp_path)
    (tmp_path / "state.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        statefile.read(tmp_path)


def _tmpfs(path: Path, opts: str) -> bool:
    path.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("opts", ["size=64k", "size=4m,nr_inodes=7"], ids=["no_space", "no_inodes"])
def test_save_on_a_full_filesystem(tmp_path, opts):
    mnt = tmp_path / "mnt"
    if not _tmpfs(mnt, opts):
        pytest.skip("cannot mount a tmpfs here (needs root and mount(8))")
    try:
        small = {"step": 1, "w": torch.zeros(16)}
        first = ckpt.save(mnt, 1, small, {"path": "/m", "fingerprint": "f", "tokenizer": "t"}, 1, keep=3)
        big = {"step": 2, "w": torch.zeros(64 * 1024)}  # 256 KiB: more than the 64 KiB disk holds
        with pytest.raises(CheckpointError, match=r"checkpoint .*step_00000002.*bytes") as e:
            ckpt.save(mnt, 2, big if "size=64k" in opts else small, {"path": "/m", "fingerprint": "f",
                                                                       "tokenizer": "t"}, 1, keep=3)
        assert "\n" not in str(e.value)
        assert sorted(p.name for p in (mnt / "checkpoints").iterdir()) == ["step_00000001"]  # no .tmp left
        assert ckpt.latest_good(mnt, {"path": "/m", "fingerprint": "f", "tokenizer": "t"}) == first
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # lazy: a mapped safetensors file may still be open


def test_save_where_the_directory_cannot_be_made(tmp_path):
    (tmp_path / "checkpoints").write_text("a file, not a directory")
    with pytest.raises(CheckpointError, match="cannot write"):
        ckpt.save(tmp_path, 1, {"step": 1}, {"path": "/m", "fingerprint": "f", "tokenizer": "t"}, 1, keep=3)
