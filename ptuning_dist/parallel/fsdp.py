"""torch FSDP2 as the second way to partition the frozen backbone over the data-parallel group.

``fully_shard`` each transformer block, then ``FrozenLM`` itself as the root over a DeviceMesh of
the DP group (megatron's, under TP: each TP shard is partitioned among its DP peers only). The
root holds what no block does (word and position embeddings, final norm, head), gathered when
``FrozenLM``'s forward starts. Wrapping the word embeddings separately left them unsharded after
each step here; under the common root they are resharded. The encoder is never wrapped.
"""
from __future__ import annotations

from ptuning_dist.model import PTuningModel
from ptuning_dist.parallel.checkpointing import transformer_blocks


def shard_frozen_fsdp2(model: PTuningModel, dp_group) -> int:
    """Partition ``model.frozen`` in place; returns the data-parallel size it was sharded over."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    group = dp_group if dp_group is not None else dist.group.WORLD
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = DeviceMesh.from_group(group, device_type=device_type)
    for block in transformer_blocks(model.backbone.model):
        fully_shard(block, mesh=mesh)
    fully_shard(model.frozen, mesh=mesh)
    return dist.get_world_size(group)
