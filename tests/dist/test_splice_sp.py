"""The splice op under sequence parallelism with real gloo collectives (tests/workers/splice_sp_worker.py)."""
from __future__ import annotations

import pytest
from distutil import ROOT


@pytest.mark.parametrize("n", [2, 3])
def test_sequence_parallel_composition_over_gloo(n):
    """The op under sequence parallelism with real collectives (tests/workers/splice_sp_worker.py): a
    vocabulary-parallel table reduce-scattered along s, and a replicated table writing only this
    rank's chunk, each equal to the unsharded op's chunk; prompt gradients equal on every rank."""
    from distutil import torchrun

    p = torchrun(n, ROOT / "tests" / "workers" / "splice_sp_worker.py", timeout=300)
    assert p.stdout.count("SP_OK") == n, p.stdout + p.stderr
