"""Run by tests/test_distributed.py under the deepspeed launcher (2 ranks, one host): DeepSpeed's
CPU comm op makes one /dev/shm buffer per rank; launch.unlink_deepspeed_shm removes the names and
its shared-memory all-reduce still works through the existing mappings."""
import os

import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402
import deepspeed.comm as ds_comm  # noqa: E402

from ptuning_dist.compat.deepspeed_shm import deepspeed_shm_file, unlink_deepspeed_shm  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo", distributed_port=int(os.environ["MASTER_PORT"]), verbose=False)
rank, world = dist.get_rank(), dist.get_world_size()
assert os.environ.get("LOCAL_SIZE") == str(world), os.environ.get("LOCAL_SIZE")
mine = deepspeed_shm_file(rank)
assert mine.exists(), f"DeepSpeed made no {mine}: the unlink has nothing to do"
unlink_deepspeed_shm()
assert not mine.exists()
dist.barrier()
assert not any(deepspeed_shm_file(r).exists() for r in range(world))
x = torch.full((1000,), float(rank + 1))
ds_comm.inference_all_reduce(x)  # the shared-memory path, through the mappings made before the unlink
assert torch.equal(x, torch.full((1000,), float(sum(range(1, world + 1))))), x[:4]
print(f"rank {rank}: shm all-reduce ok after unlink", flush=True)
