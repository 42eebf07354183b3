"""megatron-core distributed checkpoints (``torch_dist``, what Megatron-LM and Megatron-Bridge
write) as a backbone format of the megatron backend, and the converter's writer.

A ``torch_dist`` backbone directory holds the checkpoint (``metadata.json`` with
``"sharded_backend": "torch_dist"``, ``.metadata``, ``common.pt``, ``__*.distcp``) and, beside it,
the model's Hugging Face ``config.json`` and tokenizer files. Loading builds this rank's stage
uninitialised (``megatron_import.new_stage``) and reads its ``sharded_state_dict()`` with
``dist_checkpointing.load``: each rank reads only its shards, at any TP/PP (megatron-core
reshards), and a fully parallel wrapper over the DP group splits the reads of what DP replicas
share (``exchange_algo="gather_object"``: the default broadcast allocates on CUDA; cpu-facts).

Before any of it is read: the checkpoint's ``.metadata`` (a pickle, in torch's DCP format) is
checked to name only the classes DCP metadata is made of, so unpickling it runs no code; every
tensor the stage needs must be in it with the global shape the config implies, else one
``CheckpointError`` naming the directory and the tensor (another architecture or size).

A tied head at pp > 1: the last stage's own ``output_layer.weight`` is read from (and never
written as anything but a replica of) ``embedding.word_embeddings.weight``, so a checkpoint
written at one PP loads at any other.
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch

from ptuning_dist.errors import CheckpointError

RECORD = "ptuning_checkpoint.json"  # what the converter records: source model, its fingerprint, dtype
WORDS = "embedding.word_embeddings.weight"
# the classes the pickled DCP metadata may name (seen in megatron-core 0.16 / torch 2.13 checkpoints);
# from torch itself only torch.Size and the dtype / layout / memory-format constants
SAFE_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "BytesStorageMetadata",
                                              "TensorStorageMetadata", "MetadataIndex", "ChunkStorageMetadata",
                                              "TensorProperties", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "LoadPlan", "ReadItem", "LoadItemType"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "tuple", "list", "dict", "bytearray"},
    "_codecs": {"encode"},
}


def is_torch_dist(model_dir) -> bool:
    path = Path(model_dir) / "metadata.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("sharded_backend") == "torch_dist"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CheckpointError(f"{path}: not a megatron-core checkpoint metadata file (not a JSON object)") from None


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                               (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if name not in SAFE_GLOBALS.get(module, ()):
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return super().find_class(module, name)


def check_metadata_safe(ckpt_dir) -> None:
    """Unpickle ``.metadata`` with only DCP's own classes allowed: the real load that follows
    unpickles the same bytes, which then cannot run code."""
    path = Path(ckpt_dir) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: a torch_dist checkpoint without .metadata (incomplete)")
    try:
        _SafeUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - any failure to parse is a bad file, named here
        raise CheckpointError(f"{path}: not loadable as torch_dist metadata ({e})") from None


def _tie_head(sharded: dict, tied_copy: bool) -> dict:
    """The last stage's own copy of a tied head (pp > 1) is the word embeddings' shard on disk."""
    if tied_copy and "output_layer.weight" in sharded:
        sh = sharded["output_layer.weight"]
        sh.key = WORDS
        sh.replica_id = (1, *sh.replica_id[1:]) if isinstance(sh.replica_id, tuple) else 1  # never written twice
    return sharded


def _sharded(gpt, cfg, pp: int) -> dict:
    from ptuning_dist.backbone.families import family

    tied = family(cfg.model_type).shape(cfg.to_dict()).tied_embeddings
    return _tie_head(gpt.sharded_state_dict(), tied and pp > 1 and gpt.post_process)


def _check_shapes(ckpt_dir, sharded: dict) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    for sh in sharded.values():
        if not isinstance(sh, ShardedTensor):
            continue
        have = meta.get(sh.key)
        if have is None:
            raise CheckpointError(f"{ckpt_dir}: no tensor {sh.key!r} in the torch_dist checkpoint (its config.json "
                                  "needs it: another architecture?)")
        if tuple(have.global_shape) != tuple(sh.global_shape):
            raise CheckpointError(f"{ckpt_dir}: tensor {sh.key!r} has global shape {list(have.global_shape)}, "
                                  f"the config.json beside it implies {list(sh.global_shape)}")


def load_stage(model_dir, dtype: torch.dtype, tp: int, tp_rank: int, pp: int, stage: int):
    """This rank's frozen GPTModel stage read from a ``torch_dist`` directory (any TP/PP). Returns
    (GPTModel, a report naming the checkpoint)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    from ptuning_dist.backbone.megatron_import import fill, hf_config, new_stage

    model_dir = Path(model_dir)
    check_metadata_safe(model_dir)
    cfg = hf_config(model_dir)
    gpt = new_stage(cfg, dtype, tp, pp, stage)
    sharded = _sharded(gpt, cfg, pp)
    _check_shapes(model_dir, sharded)
    strategy = FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(), ps.get_data_parallel_group(),
                                                exchange_algo="gather_object")
    try:
        state = dist_checkpointing.load(sharded, str(model_dir), sharded_strategy=strategy)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - megatron's CheckpointingException, torch's DCP errors
        raise CheckpointError(f"{model_dir}: the torch_dist checkpoint did not load ({str(e).splitlines()[0]})") from None
    fill(gpt, {k: (lambda v=v: v) for k, v in state.items() if not k.endswith("_extra_state")},
         f"{model_dir} stage {stage}")
    return gpt, {"format": "torch_dist", "checkpoint": str(model_dir)}  # megatron-core does the reading


def save_stage(gpt, cfg, out_dir, pp: int) -> None:
    """Write this rank's stage into the ``torch_dist`` checkpoint at ``out_dir`` (a collective: every
    rank calls it). Every DP rank writes its part of what DP replicas share."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    strategy = FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy("torch_dist", 1),
                                                ps.get_data_parallel_group())
    dist_checkpointing.save(_sharded(gpt, cfg, pp), str(out_dir), sharded_strategy=strategy)


def source_fingerprint(model_dir) -> str:
    """The fingerprint of a ``torch_dist`` backbone: the converter's record of the Hugging Face
    source it was converted from without loss (so a prompt table trained on either loads on the
    other); for a checkpoint written elsewhere, a hash of its config.json and metadata files."""
    import hashlib

    model_dir = Path(model_dir)
    rec = model_dir / RECORD
    if rec.is_file():
        try:
            return json.loads(rec.read_text())["fingerprint"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{rec}: not a converter record (no \"fingerprint\")") from None
    h = hashlib.sha256()
    for name in ("config.json", "metadata.json", ".metadata"):
        p = model_dir / name
        h.update(name.encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()
