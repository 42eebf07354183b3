"""benchmarks/splice_speed.py: its smoke run passes its own equality checks and reports host syncs
for the paper's splice (it calls ``.nonzero()``) and none for the fused op; its counter counts what
copies data to the host and nothing else."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_splice_speed_quick_counts_syncs():
    res = subprocess.run([sys.executable, "benchmarks/splice_speed.py", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    line = re.search(r"^syncs (.*)$", res.stdout, re.M)
    assert line, res.stdout
    syncs = dict(kv.split("=") for kv in line.group(1).split())
    assert int(syncs["naive(paper)"]) > 0
    assert int(syncs["fused"]) == 0 and int(syncs["fused(megatron)"]) == 0


def test_sync_counter():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from splice_speed import SyncCounter

    x = torch.tensor([0.0, 1.0, 2.0])
    with SyncCounter() as counter:
        x + 1
    assert counter.count == 0
    with SyncCounter() as counter:
        x.nonzero()
        x.sum().item()
    assert counter.count == 2, counter.ops
