"""What one ZeRO-3 step gather costs on this machine, and what a shared-memory gather would (issue 17).

    .venv/bin/python benchmarks/gather_bound.py          # prints a table (2 ranks); --mib N: the model's fp32 size

Why: with ``--zero3_gather step`` the ZeRO-3 step of GPT-2-small at DP=2 is bound by one gather of the
stage (each rank receives half the model's bytes, ~250 MB fp32) over gloo's loopback TCP
(``RESULTS.md``, "ZeRO-3 gathering once per step"). This measures, in 2 ranks of one node with one
thread each (as the benchmark's ranks), the seconds to assemble the whole model on every rank:

- ``gloo all_gather_into_tensor``: what DeepSpeed's gather does on CPU (one coalesced flat buffer);
- ``gloo all_reduce`` of the zero-padded partitions (the same bytes summed: the alternative below);
- ``DeepSpeed shm all_reduce`` of the zero-padded partitions (``torch.ops.deepspeed.inference_all_reduce_``,
  the shared-memory kernel DeepSpeed builds for CPU inference): what a shared-memory gather could
  reach on one node. Summing zeros is exact except that -0.0 becomes +0.0.

Each is timed 3 times after one warm-up; the median is printed with the bytes each rank receives.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def worker(mib: int) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed import comm as dscomm

    rank, world = dist.get_rank(), dist.get_world_size()
    n = mib * (1 << 20) // 4 // world * world
    part = torch.randn(n // world)
    full = torch.empty(n)

    def gather():
        dist.all_gather_into_tensor(full, part)

    def padded(reduce):
        def run():
            full.zero_()
            full[rank * part.numel():(rank + 1) * part.numel()] = part
            reduce(full)
        return run

    runs = {"gloo all_gather_into_tensor": gather,
            "gloo all_reduce (zero-padded)": padded(dist.all_reduce),
            "DeepSpeed shm all_reduce (zero-padded)": padded(
                lambda t: dscomm.inference_all_reduce(t, op=dist.ReduceOp.SUM))}
    ref = None
    for name, fn in runs.items():
        fn()
        ts = []
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        ref = full.clone() if ref is None else ref
        same = bool(torch.equal(full.abs(), ref.abs()))  # the same values (up to the sign of zero)
        t = statistics.median(ts)
        if rank == 0:
            recv = n * 4 * (world - 1) / world
            print(f"| {name} | {n * 4 / 1e6:.0f} | {t:.3f} | {recv / t / 1e9:.2f} | {same} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=475, help="the model's fp32 MiB (GPT-2-small: 475)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.mib)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ptuning_dist.parallel.launch import free_port

    print("| gather | MB assembled | seconds (median of 3) | GB/s received per rank | same values |")
    print("|---|---|---|---|---|", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOCAL_SIZE": "2"}  # DeepSpeed's shm op reads it (its launcher sets it)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), __file__, "--worker", "--mib", str(a.mib)], env=env, check=True)


if __name__ == "__main__":
    main()
