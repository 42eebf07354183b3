"""Test and measurement knobs, in one place: the environment variables that make production code
behave differently for a test or a benchmark. Read here and nowhere else; none is for real runs.

- ``PTUNING_FAULT=<rank>:<point>:<step>``: a failure drill. ``1:step:3``: rank 1 dies as step 3
  starts; ``0:save:6``: rank 0 dies inside the step-6 save, after writing the state and before the
  atomic rename (``tests/e2e/test_stop.py``, ``tests/dist/test_distributed.py``).
- ``PTUNING_ZERO_UNPATCHED=trace_check,backward_count,recompute_release``: leave the named DeepSpeed
  fixes out (``compat/deepspeed_megatron.py``): the regression tests show that upstream still needs
  each one.
- ``PTUNING_SPLICE_NO_OUTPUT_CACHE=1``: the C++ splice allocates every large output afresh
  (``benchmarks/splice_speed.py`` measures what its output cache saves).
"""
from __future__ import annotations

import os

ZERO_FIXES = ("trace_check", "backward_count", "recompute_release")


def maybe_fail(point: str, step: int) -> None:
    """Die here if ``PTUNING_FAULT`` names this rank, point and step."""
    spec = os.environ.get("PTUNING_FAULT")
    if not spec:
        return
    rank, where, at = spec.split(":")
    if where == point and int(at) == step and int(rank) == int(os.environ.get("RANK", 0)):
        print(f"PTUNING_FAULT: rank {rank} dies at {point} {step}", flush=True)
        os._exit(17)


def zero_fix_enabled(fix: str) -> bool:
    """False if ``PTUNING_ZERO_UNPATCHED`` leaves this DeepSpeed fix out."""
    if fix not in ZERO_FIXES:
        raise ValueError(f"unknown DeepSpeed fix {fix!r}; known: {ZERO_FIXES}")
    return fix not in os.environ.get("PTUNING_ZERO_UNPATCHED", "").split(",")


def splice_output_cache() -> bool:
    """False if ``PTUNING_SPLICE_NO_OUTPUT_CACHE`` is set: the C++ splice's output cache is off."""
    return "PTUNING_SPLICE_NO_OUTPUT_CACHE" not in os.environ
