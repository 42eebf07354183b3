"""Check a DeepSpeed JSON against the run config, fill its "auto" fields, and never duplicate.

The run config is the source of truth for batch sizes, clipping and the learning rate; the JSON
may say ``"auto"`` (or nothing) for them, and if it names a value that contradicts the run config
the run stops before any process group work, naming the key and the file. DeepSpeed here only
partitions the frozen backbone (no optimizer inside it), so an ``optimizer``/``scheduler``
section is checked for consistency and then dropped: the encoder's AdamW lives outside.

The one reader of a DeepSpeed JSON: ``read_ds_json`` parses it, ``ds_settings`` interprets what the
run and the planner both need (ZeRO stage, backbone dtype, parameter offload); ``load_ds_config``
reconciles it with a run config. Importing this module does not import torch (the planner uses it).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from ptuning_dist.config import RunConfig, read_json
from ptuning_dist.errors import ConfigError

_DTYPE_OF = {"bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class DsSettings:
    stage: int  # ZeRO stage 0-3
    dtype: str  # the backbone dtype the bf16/fp16 sections imply (float32 when neither is on)
    offload: bool  # zero_optimization.offload_param to cpu or nvme


def ds_settings(d: dict, src: str) -> DsSettings:
    """The JSON's ZeRO stage, dtype and parameter offload, checked (``src`` names the file in errors)."""
    z = d.get("zero_optimization", {})
    stage = z.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage = {stage!r}, must be 0, 1, 2 or 3")
    on = [k for k in ("bf16", "fp16") if d.get(k, {}).get("enabled") is True]
    if len(on) > 1:
        raise ConfigError(f"{src}: bf16.enabled and fp16.enabled are both true; pick one")
    offload = str(z.get("offload_param", {}).get("device", "none")).lower() in ("cpu", "nvme")
    return DsSettings(stage, _DTYPE_OF[on[0]] if on else "float32", offload)


def _fill(d: dict, key: str, value, src: str, field: str) -> None:
    have = d.get(key, "auto")
    if have == "auto":
        d[key] = value
    elif have != value:
        raise ConfigError(f"{src}: {key} = {have!r} contradicts {field} = {value!r} "
                          f"(set it to \"auto\" to take the run config's value)")


def read_ds_json(path: str | Path) -> dict:
    """The DeepSpeed JSON as a dict; a missing file, bad JSON (with its line) or a non-object is a
    ConfigError naming --ds_config."""
    return read_json(path, "--ds_config")


def load_ds_config(path: str | Path, cfg: RunConfig, world_size: int) -> tuple[dict, str]:
    """(the DeepSpeed config to pass to deepspeed.initialize, the backbone dtype it implies)."""
    path = Path(path)
    d = copy.deepcopy(read_ds_json(path))
    src = f"--ds_config {path}"
    dp, accum = cfg.layout(world_size)
    t = cfg.train
    _fill(d, "train_micro_batch_size_per_gpu", t.micro_batch_size, src, "train.micro_batch_size")
    _fill(d, "gradient_accumulation_steps", accum, src, f"global/(micro x dp={dp})")
    _fill(d, "train_batch_size", t.global_batch_size, src, "train.global_batch_size")
    _fill(d, "gradient_clipping", t.max_grad_norm, src, "train.max_grad_norm")
    if d["train_batch_size"] != d["train_micro_batch_size_per_gpu"] * d["gradient_accumulation_steps"] * dp:
        raise ConfigError(f"{src}: train_batch_size != micro x accumulation x dp ({dp})")

    settings = ds_settings(d, src)
    d.setdefault("zero_optimization", {}).setdefault("stage", 0)
    dtype = settings.dtype
    if dtype == "float16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{src}: fp16 needs a GPU (DeepSpeed's CPU accelerator refuses it); "
                              "use bf16 on CPU (\"bf16\": {\"enabled\": true})")
    if cfg.model.dtype not in ("float32", dtype):
        raise ConfigError(f"{src}: implies backbone dtype {dtype}, but model.dtype = {cfg.model.dtype}")

    opt = d.pop("optimizer", None)
    if opt is not None:
        kind = str(opt.get("type", "")).lower()
        if kind not in ("adam", "adamw"):
            raise ConfigError(f"{src}: optimizer.type {opt.get('type')!r}: the encoder is trained with AdamW")
        params = opt.get("params", {})
        for key, field, value in (("lr", "train.lr", t.lr), ("weight_decay", "train.weight_decay", t.weight_decay)):
            if params.get(key, "auto") not in ("auto", value):
                raise ConfigError(f"{src}: optimizer.params.{key} = {params[key]!r} contradicts {field} = {value!r}")
    d.pop("scheduler", None)  # warm-up/decay come from train.warmup_steps and train.max_steps
    d.setdefault("steps_per_print", 10**9)  # our loop logs; keep DeepSpeed quiet
    return d, dtype


def zero_stage(ds_cfg: dict | None) -> int:
    return 0 if ds_cfg is None else int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
