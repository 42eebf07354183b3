"""mpirun (the PyPI mpich wheel) starting 2 ranks: rank, world and local rank from MPI's own variables."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from distutil import ROOT

from ptuning_dist.parallel import launch


def test_mpirun_discovers_rank_world_and_local_rank(tmp_path):
    """mpirun (the PyPI mpich wheel's hydra): rank and world through mpi4py discovery, the local
    rank from MPI's own MPI_LOCALRANKID."""
    from distutil import env

    code = ("import sys; sys.path.insert(0, %r)\n"
            "from ptuning_dist.parallel import launch\n"
            "D = launch.init(need_group=True)\n"
            "import os, torch.distributed as dist\n"
            "open(f'%s/rank{D.rank}', 'w').write(f\"{D.rank} {D.world} {D.local_rank} {os.environ['MPI_LOCALRANKID']}\")\n"
            "dist.barrier(); dist.destroy_process_group()\n") % (str(ROOT), tmp_path)
    mpirun = Path(sys.executable).parent / "mpirun"
    res = subprocess.run([str(mpirun), "-np", "2", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**env(), "MASTER_PORT": str(launch.free_port())})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    seen = sorted(f.read_text() for f in tmp_path.glob("rank*"))  # files: the two ranks' stdout interleave
    assert seen == ["0 2 0 0", "1 2 1 1"], res.stdout
