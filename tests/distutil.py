"""Helpers for the multi-process tests: run the launchers and tests/workers/dist_worker.py, read what
they wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ptuning_dist.parallel.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "dist_worker.py"
TRAIN = ROOT / "launchers" / "train.py"
BIN = Path(sys.executable).parent

# global batch 16 = micro 4 x accumulation 2 x dp 2; log every step to compare losses step by step
COMMON = ["--max_steps", 3, "--micro_batch_size", 4, "--global_batch_size", 16, "--log_every", 1]
# the tiny LLaMA's runs (family_dirs["llama"]); --test_split dev (= the eval split): no final evaluation on
# RTE's 277 val rows, which these comparisons do not read
LLAMA_RTE = ["--task", "rte", "--max_seq_len", 96, "--test_split", "dev"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # a private extension cache: runs with other build flags must not rebuild DeepSpeed's comm op here
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ptuning_dist_torch_extensions"))
    e.pop("PTUNING_FAULT", None)
    return e


def run(cmd, ok=True, extra_env=None, timeout=600):
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env={**env(), **(extra_env or {})},
                       capture_output=True, text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def torchrun(n, script, *args, **kw):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n,
                "--master_port", free_port(), script, *args], **kw)


def losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]  # not the evaluation lines (the dev curve)


def record(out: Path, rank: int) -> dict:
    return torch.load(out / "rec" / f"rank{rank}.pt")


def assert_matches_reference(reference: Path, out: Path, ranks=(0,), steps=(1, 3), tol=1e-5) -> None:
    """Same losses at every step, and the given ranks' encoder gradients at ``steps``, as the
    single-process reference run."""
    a, b = losses(reference), losses(out)
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol, (a, b)
    ref = record(reference, 0)
    for r in ranks:
        rec = record(out, r)
        for step in steps:
            assert ref["grads"][step].keys() == rec["grads"][step].keys()
            for name, g in ref["grads"][step].items():
                torch.testing.assert_close(rec["grads"][step][name], g, atol=tol, rtol=1e-4, msg=f"{step} {name}")


def assert_partitions_predicted(out: Path, model_dir, world: int, tp: int = 1, pp: int = 1,
                                partitioning: str = "none") -> None:
    """Every rank of a megatron run holds exactly the frozen parameters, name by name and element
    count by element count, that the memory model (``ptuning_dist.planning.memory``) predicts."""
    from ptuning_dist.planning.memory import predicted_partitions
    from ptuning_dist.planning.shape import ModelShape

    shape, dp = ModelShape.from_hf_config(model_dir), world // (tp * pp)
    for rank in range(world):
        got = [tuple(x) for x in record(out, rank)["partitions"]]
        want = predicted_partitions(shape, tp, pp, dp, rank, partitioning)
        assert got == want, f"rank {rank}: recorded {got} != predicted {want}"
