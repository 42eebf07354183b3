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
from pathlib import Path

import torch
import torch.distributed as dist

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


class HostHeap:
    """Keeps glibc's heap from growing without bound under ZeRO-3 on CPU.

    ZeRO-3 gathers and frees multi-MiB parameter buffers every layer. glibc raises its mmap
    threshold after each such free, so later buffers come from the heap, which fragments and is
    not returned: measured here (benchmarks/zero_memory.py), a GPT-2-small backbone at DP=2 grew
    ~150 MiB of RSS per step, to twice ZeRO-0's, with no parameter left gathered.
    ``PTUNING_HOST_MALLOC`` picks the remedy (CPU runs only; GPU memory has its own allocator):

    - ``auto`` (default): ``trim`` when the frozen weights are partitioned over ranks (ZeRO-3 or
      FSDP2 at DP > 1), else ``off``: without per-layer gathers there is nothing to fragment, and
      pinning the threshold only page-faults every large activation (one process, measured in
      benchmarks/vs_peft.py: steps 1.4x slower on the longer task). Under ZeRO-3 ``trim`` is the
      middle (benchmarks/vs_peft.py, 2 ranks: 1.3-1.4x PEFT's steps/s at ~0.65x its peak memory;
      ``off`` 1.6-1.7x at ~0.8x; ``mmap`` 0.9-1.0x at ~0.5x).
    - ``mmap``: pin the mmap threshold at 1 MiB (= ``MALLOC_MMAP_THRESHOLD_=1048576``, which
      glibc only reads at start-up): buffers >= 1 MiB are mmapped and returned on free, and ZeRO-3's
      RSS stays flat (within ~1.2x ZeRO-0's, instead of 2x); every gather page-faults fresh pages
      (steps 30-60% slower than ``off`` here). The leanest.
    - ``trim``: ``malloc_trim(0)`` after every step: the heap is returned each step, so it cannot
      grow across steps, but regrows within one (peak ~1.5x ZeRO-0's in benchmarks/zero_memory.py).
    - ``off``: glibc's defaults (fastest steps, peak ~2x ZeRO-0's under ZeRO-3 here).
    """

    def __init__(self, device: torch.device, partitioned: bool = False):
        self.mode = self.mode_for(device, partitioned)
        self.libc = None
        if self.mode != "off":
            import ctypes
            import ctypes.util

            try:
                self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                self.libc.malloc_trim  # noqa: B018 - glibc only
            except (OSError, AttributeError):
                self.libc, self.mode = None, "off"
        if self.mode == "mmap":
            self.libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD

    @staticmethod
    def mode_for(device: torch.device, partitioned: bool) -> str:
        """``PTUNING_HOST_MALLOC`` resolved for this run (``auto`` -> ``trim`` or ``off``)."""
        mode = os.environ.get("PTUNING_HOST_MALLOC", "auto")
        if mode not in ("auto", "trim", "mmap", "off"):
            raise ConfigError(f"PTUNING_HOST_MALLOC={mode!r}: use auto, mmap, trim or off")
        if mode == "auto":
            mode = "trim" if partitioned else "off"
        return mode if device.type == "cpu" else "off"

    def after_step(self) -> None:
        if self.mode == "trim":
            self.libc.malloc_trim(0)


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


def init_model_parallel(tp: int, pp: int = 1) -> None:
    """megatron-core's process groups (TP x PP x DP) over the existing world."""
    from megatron.core import parallel_state as ps

    from ptuning_dist.parallel import megatron_cpu

    megatron_cpu.enable()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def deepspeed_shm_file(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU comm op creates for ``rank`` (its shm.cpp names it by
    uid, MASTER_ADDR, MASTER_PORT and rank) when every rank is on one host (LOCAL_SIZE == world)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_deepspeed_shm() -> None:
    """Remove this rank's DeepSpeed shm buffer from /dev/shm once every rank has mapped it.

    DeepSpeed 0.19.8 never unlinks it: each single-host run on CPU left 66 MiB per rank in
    /dev/shm (RAM), under a new name per port, until a machine running many short jobs (our tests,
    the benchmarks) had 18 GB of it and the kernel OOM-killed a run. Each rank maps every rank's
    buffer inside ``init_distributed``; after a barrier the names can go (the mappings stay valid,
    POSIX shm lives until the last unmap), so nothing is left even if the run is killed."""
    if not dist.is_initialized() or os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    dist.barrier()
    deepspeed_shm_file(dist.get_rank()).unlink(missing_ok=True)


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
            from ptuning_dist.ops.jit import clear_stale_locks

            clear_stale_locks()  # DeepSpeed JIT-builds its CPU comm op here: never wait on a dead build's lock
            port = int(os.environ.get("MASTER_PORT", 29500))
            with quiet_unless_main():
                deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=port, verbose=False,
                                           timeout=timedelta(seconds=timeout_s))
            unlink_deepspeed_shm()
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
