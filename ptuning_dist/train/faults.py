"""Failure drills: make one rank die at a chosen point, to test what the others and the
checkpoints do. Off unless ``PTUNING_FAULT=<rank>:<point>:<step>`` is set, e.g. ``1:step:3`` (rank 1
dies as step 3 starts) or ``0:save:6`` (rank 0 dies inside the step-6 save, after writing the
state and before the atomic rename)."""
from __future__ import annotations

import os


def maybe_fail(point: str, step: int) -> None:
    spec = os.environ.get("PTUNING_FAULT")
    if not spec:
        return
    rank, where, at = spec.split(":")
    if where == point and int(at) == step and int(rank) == int(os.environ.get("RANK", 0)):
        print(f"PTUNING_FAULT: rank {rank} dies at {point} {step}", flush=True)
        os._exit(17)
