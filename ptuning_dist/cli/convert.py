"""``ptuning-convert`` (``launchers/convert.py``): a Hugging Face model directory -> a megatron-core
``torch_dist`` checkpoint, shard-wise and in parallel, so that a large job converts once and then
starts from it (``--model OUT --backend megatron``, at any TP/PP).

Run it under the same launchers as training, with world = tp x pp x dp ranks:

    torchrun --nproc_per_node 4 launchers/convert.py --model HF_DIR --out OUT --tp 2 --pp 2

Each rank imports only its TP slice of its stage's tensors (``megatron_import.build_stage``) and
writes its part (every DP replica a share of what they hold in common). The checkpoint is written
into ``OUT.partial`` and renamed to ``OUT`` when every rank has written: nothing half-written
under ``OUT``. Beside it: the source's config.json and tokenizer files, and ``ptuning_checkpoint.json``
(source path, its fingerprint, dtype) so prompt tables trained on either load on the other.
"""
from __future__ import annotations

from dataclasses import dataclass

from ptuning_dist.cli import args as cli_args
from ptuning_dist.cli.common import Parser, run
from ptuning_dist.config import Dtype

DESCRIPTION = "Convert a Hugging Face model directory into a megatron-core torch_dist checkpoint, shard-wise."


@dataclass
class ConvertArgs:
    model: str
    """The Hugging Face model directory (config.json, safetensors, tokenizer)."""
    out: str
    """The checkpoint directory to create (must not exist)."""
    tp: int = 1
    """Tensor-parallel size the converting ranks use (the checkpoint loads at any TP/PP)."""
    pp: int = 1
    """Pipeline-parallel size the converting ranks use."""
    dtype: Dtype | None = None
    """The stored dtype (default: the files' own, which keeps the fingerprint of the source)."""

    def __post_init__(self):
        from ptuning_dist.errors import ConfigError

        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, not {getattr(self, name)}")


def convert(args: ConvertArgs) -> str:
    import json
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    from ptuning_dist.backbone.hf import DTYPES, fingerprint
    from ptuning_dist.backbone.megatron_dist import RECORD, save_stage
    from ptuning_dist.backbone.megatron_import import build_stage, hf_config
    from ptuning_dist.backbone.safetensors_io import WeightFiles
    from ptuning_dist.errors import ConfigError
    from ptuning_dist.parallel import launch
    from ptuning_dist.parallel.parallelize import check_megatron_model

    src, out = Path(args.model), Path(args.out)
    check_megatron_model(src, args.tp, args.pp)
    if out.exists():
        raise ConfigError(f"--out: {out} exists; the converter writes a new directory")
    _, world = launch.env_world()
    if world % (args.tp * args.pp):
        raise ConfigError(f"--tp {args.tp} x --pp {args.pp} does not divide the world size {world}")
    with WeightFiles(src, None) as files:  # the files' own dtype (one tensor's header is enough)
        stored = files.entry(files.names()[0])[1]
    dtype = DTYPES[args.dtype] if args.dtype else stored
    launch.init(need_group=True)
    launch.init_model_parallel(args.tp, args.pp)
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    tmp = out.with_name(out.name + ".partial")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous conversion that died half-way
        tmp.mkdir(parents=True)
    dist.barrier()
    gpt, _ = build_stage(src, dtype, args.tp, ps.get_tensor_model_parallel_rank(), args.pp,
                         ps.get_pipeline_model_parallel_rank())
    save_stage(gpt, hf_config(src), tmp, args.pp)
    dist.barrier()
    if rank == 0:
        for f in src.iterdir():  # config and tokenizer, not the weights
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".index.json")):
                shutil.copy2(f, tmp / f.name)
        fp = fingerprint(src)
        lossless = dtype == stored
        (tmp / RECORD).write_text(json.dumps({
            "source": str(src.resolve()), "source_fingerprint": fp, "dtype": str(dtype).removeprefix("torch."),
            "converted_at": {"tp": args.tp, "pp": args.pp, "world": world},
            # the same weights as the source (same dtype): the same fingerprint
            "fingerprint": fp if lossless else f"{fp}:{str(dtype).removeprefix('torch.')}"}, indent=1))
        tmp.rename(out)
    dist.barrier()
    return str(out)


def main(argv=None) -> int:
    def go():
        p = Parser(prog="ptuning-convert", description=DESCRIPTION)
        own = cli_args.add_fields(p, ConvertArgs)
        args = cli_args.build(ConvertArgs, p.parse_args(argv), own)
        out = convert(args)
        import torch.distributed as dist

        if dist.get_rank() == 0:
            print(f"torch_dist checkpoint -> {out}")

    return run(go)
