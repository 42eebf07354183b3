"""Who am I: rank and world size from whichever launcher started us, and the process group.

- ``deepspeed`` and ``torchrun`` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
- ``mpirun`` (MPICH/hydra: PMI_*, Open MPI: OMPI_COMM_WORLD_*) does not: DeepSpeed's MPI discovery
  (mpi4py) fills them in ``deepspeed.init_distributed``; the port comes from MASTER_PORT if set.
- ``srun python launchers/train.py`` (one task per GPU): rank, world size and local rank come from
  SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID (srun sets the STEP variable for its tasks,
  never for the batch script itself, so a plain ``python`` in a batch script stays a world of one);
  MASTER_ADDR from the batch script, else the node list's first host (``scontrol show hostnames``),
  MASTER_PORT from the script, else one derived from the job id (the same on every task).
- ``python launchers/train.py`` alone is a world of one; with ZeRO it gets a private 1-rank group.

The world size is known from the environment BEFORE any process group exists, so the run and
DeepSpeed configs are validated first and a bad layout fails fast on every rank.
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ptuning_dist.compat.deepspeed_shm import unlink_deepspeed_shm
from ptuning_dist.errors import ConfigError

_MPI_RANK = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_MPI_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
_MPI_LOCAL_RANK = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK")  # MPICH, Open MPI, PMIx


def _first(names) -> str | None:
    return next((os.environ[n] for n in names if n in os.environ), None)


def launched_by_mpi() -> bool:
    return "RANK" not in os.environ and _first(_MPI_SIZE) is not None


def launched_by_srun() -> bool:
    return "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ


def _srun_env() -> dict[str, str]:
    """torch.distributed's variables for an srun task (see the module docstring)."""
    env = {"RANK": os.environ["SLURM_PROCID"], "WORLD_SIZE": os.environ["SLURM_STEP_NUM_TASKS"],
           "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise ConfigError("srun launch: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                 timeout=60, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError) as e:
            raise ConfigError(f"srun launch: MASTER_ADDR is not set and `scontrol show hostnames {nodes}` failed "
                              f"({e}); export MASTER_ADDR in the batch script") from None
        if not out:
            raise ConfigError(f"srun launch: `scontrol show hostnames {nodes}` printed no host")
        env["MASTER_ADDR"] = out[0]
    if "MASTER_PORT" not in os.environ:
        env["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
    return env


def env_world() -> tuple[int, int]:
    """(rank, world size) from the environment, without touching any process group."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    if launched_by_srun():
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_STEP_NUM_TASKS"])
    if launched_by_mpi():
        return int(_first(_MPI_RANK) or 0), int(_first(_MPI_SIZE))
    return 0, 1


def quiet_unless_main():
    """Swallow what DeepSpeed prints while it initialises (op builds, banners) on ranks != 0."""
    return contextlib.redirect_stdout(io.StringIO()) if env_world()[0] != 0 else contextlib.nullcontext()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def agree(D: Dist, error: Exception | None) -> None:
    """Rank 0 found (or did not find) bad input while the others waited: every rank raises it.
    A barrier that carries the error (a host sync, at set-up only)."""
    from ptuning_dist.errors import PTuningError

    if D.world > 1:
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            error = PTuningError(f"(rank 0) {box[0]}")
    if error is not None:
        raise error


def data_parallel() -> tuple[int, int, object]:
    """(rank, size, group) of this rank's data-parallel group: megatron's when model parallelism
    is set up (TP replicas see the same data), else the whole world (group None)."""
    if not dist.is_initialized():
        return 0, 1, None
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_group()
    except ImportError:
        pass
    return dist.get_rank(), dist.get_world_size(), None


def broadcast_replicas(module: torch.nn.Module) -> None:
    """Make every replica of ``module`` (the encoder) equal to the first one's: over the DP
    group, then the TP group. Under pipeline parallelism both lie within the first stage, which
    alone holds the encoder."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    groups = [(None, 0)]
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            groups = [(ps.get_data_parallel_group(), ps.get_data_parallel_src_rank()),
                      (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank())]
    except ImportError:
        pass
    for group, src in groups:
        for p in module.parameters():
            dist.broadcast(p.data, src=src, group=group)


def init_model_parallel(tp: int, pp: int = 1, seed: int = 0) -> None:
    """megatron-core's process groups (TP x PP x DP) over the existing world. On CUDA also its RNG
    tracker: megatron's attention enters it on every forward ("cuda rng state model-parallel-rng is
    not added" otherwise; on CPU ``megatron_cpu`` replaces it). The frozen backbone has no dropout,
    so the seed changes no result."""
    import torch
    from megatron.core import parallel_state as ps

    from ptuning_dist.compat import megatron_cpu

    megatron_cpu.enable()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if torch.cuda.is_available():  # the GPU path, untested here (tests/gpu)
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init(need_group: bool, timeout_s: float = 600.0) -> Dist:
    """Start the process group when there is more than one rank or DeepSpeed needs one.

    ``timeout_s`` bounds every collective: a rank that died makes the others fail with an error
    instead of hanging (the deepspeed and torchrun launchers also kill the survivors)."""
    if launched_by_srun():  # before anything reads RANK: srun's variables become torch.distributed's
        os.environ.update(_srun_env())
    rank, world = env_world()
    if world > 1 or need_group:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, so no rank warns about guessing it
        import deepspeed

        if world == 1 and "MASTER_ADDR" not in os.environ and not launched_by_mpi():
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if not dist.is_initialized():
            from ptuning_dist.compat.build_lock import clear_stale_locks

            clear_stale_locks()  # DeepSpeed JIT-builds its CPU comm op here: never wait on a dead build's lock
            port = int(os.environ.get("MASTER_PORT", 29500))
            with quiet_unless_main():
                deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=port, verbose=False,
                                           timeout=timedelta(seconds=timeout_s))
            unlink_deepspeed_shm()  # compat: DeepSpeed's CPU comm op never removes its /dev/shm buffers
        rank, world = dist.get_rank(), dist.get_world_size()
    if _first(_MPI_LOCAL_RANK) is not None and "SLURM_STEP_NUM_TASKS" not in os.environ:
        # mpirun: the MPI runtime's own local rank (DeepSpeed's discovery guesses it from host names)
        os.environ["LOCAL_RANK"] = _first(_MPI_LOCAL_RANK)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        # one GPU per task (srun --gpus-per-task=1, --gpu-bind=single): each task sees its GPU as cuda:0
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, local_rank, device)
