"""DeepSpeed 0.19.8's CPU comm op leaves a 66 MiB /dev/shm file per rank per run: unlink it.

Used under the ``deepspeed`` launcher on one host (LOCAL_SIZE == world): each rank maps every rank's
buffer inside ``deepspeed.init_distributed`` and DeepSpeed never unlinks them. A machine running
many short jobs (our tests, the benchmarks) had 18 GB of them, under a new name per port, until the
kernel OOM-killed a run. After a barrier the names can go (the mappings stay valid: POSIX shm lives
until the last unmap), so nothing is left even if the run is killed. ``tests/workers/shm_worker.py``
shows the all-reduce still works after the unlink.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist


def deepspeed_shm_file(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU comm op creates for ``rank`` (its shm.cpp names it by
    uid, MASTER_ADDR, MASTER_PORT and rank) when every rank is on one host (LOCAL_SIZE == world)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_deepspeed_shm() -> None:
    """Remove this rank's DeepSpeed shm buffer from /dev/shm once every rank has mapped it (after
    ``deepspeed.init_distributed``; a barrier makes sure)."""
    if not dist.is_initialized() or os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    dist.barrier()
    deepspeed_shm_file(dist.get_rank()).unlink(missing_ok=True)
