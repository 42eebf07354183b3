"""Shard-wise loading of a Hugging Face backbone partitioned over the data-parallel ranks: each
rank reads from the safetensors only the elements its partition holds, after sharding, into the
partition itself (torchtune's order: build -> freeze -> checkpoint-wrap -> shard -> load).

- ZeRO-3: the model was built under ``zero.Init`` (``HFBackbone.empty(zero3=True)``), so every
  parameter is already its flat partition ``ds_tensor``: elements [r c, (r + 1) c) of the
  row-major tensor, c = ceil(numel / dp), i.e. one contiguous byte range of the file. Each rank
  reads its range and writes it in place: no gather, no broadcast. (transformers' own path under
  ``HfDeepSpeedConfig`` has rank 0 read every tensor and broadcast each module to the others: rank 0
  maps the whole checkpoint, and every rank receives ~2x the model in broadcasts; measured in
  ``benchmarks/RESULTS.md``, "Shard-wise loading".)
- FSDP2: the model was built with its parameters on the meta device and ``fully_shard``-ed;
  ``to_empty`` allocates each rank's dim-0 chunk (rows [r c, r c + local rows), c = ceil(rows /
  dp)); each rank reads those rows. Buffers (RoPE's frequencies) are kept across ``to_empty``,
  which would leave them uninitialised.

Peak per rank while loading: its partition plus the one slice in flight (``planning/memory.py``,
``backend="hf"``). The tied head is the word embedding's parameter (named once); a parameter no
file holds is a ``CheckpointError`` naming the file and tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# what torch's checkpoint_wrapper inserts into the names of the modules it wraps
CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


def fill_partitions(backbone, zero3: bool, device: torch.device) -> dict:
    """Fill every frozen parameter's partition of ``backbone`` (an ``HFBackbone.empty``) from its
    model directory. Returns the reader's counts (bytes read, files opened)."""
    from ptuning_dist.backbone.safetensors_io import WeightFiles

    model = backbone.model
    if not zero3:
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        model.to_empty(device=device)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    with WeightFiles(backbone.path, backbone.dtype) as files, torch.no_grad():
        for wrapped, p in model.named_parameters():
            name = wrapped.replace(CHECKPOINT_PREFIX, "")  # activation checkpointing wrapped the blocks first
            if zero3:
                numel, part = p.ds_numel, p.ds_tensor.numel()
                start = min(dist.get_rank(group=p.ds_process_group) * part, numel)
                stop = min(start + part, numel)
                p.ds_tensor[: stop - start].copy_(files.read_flat(name, tuple(p.ds_shape), start, stop))
                p.ds_tensor[stop - start:].zero_()
            else:
                local, rows = p.to_local(), p.shape[0]
                chunk = -(-rows // p.device_mesh.size())
                start = min(p.device_mesh.get_local_rank() * chunk, rows)
                local.copy_(files.read(name, tuple(p.shape), rows=(start, start + local.shape[0])))
        return {"bytes_read": files.bytes_read, "files_opened": files.files_opened}
