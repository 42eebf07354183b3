"""The layout rules, in one place: what a TP x PP x DP layout of a model must divide.

- TP divides the attention heads, the key/value groups and the FFN width (megatron splits each
  across TP ranks: whole heads, whole groups, equal FFN slices);
- PP divides the transformer layers (stage s holds layers [s L/pp, (s+1) L/pp));
- TP x PP divides the world (dp = world / (tp x pp): TP fastest, PP slowest, megatron's order);
- micro x dp divides the global batch (accumulation = global / (micro x dp)).

The training run, the megatron backbone and the planner all call ``check_layout``; each names the
knobs its user set (``RUN_NAMES``: the run config's fields; ``PLAN_NAMES``: the planner's flags).
"""
from __future__ import annotations

from dataclasses import dataclass

from ptuning_dist.errors import ConfigError
from ptuning_dist.planning.shape import ModelShape


@dataclass(frozen=True)
class Names:
    """How errors name the layout's knobs ("{}" is the value)."""

    tp: str
    pp: str
    tp_pp: str  # "{} x {}": tp, pp
    micro: str
    global_batch: str
    prefix: str = ""


RUN_NAMES = Names("parallel.tp = {}", "parallel.pp = {}", "parallel.tp x parallel.pp = {} x {}",
                  "train.micro_batch_size {}", "train.global_batch_size {}")
PLAN_NAMES = Names("--tp {}", "--pp {}", "--tp x --pp = {} x {}", "--micro_batch_size {}", "--global_batch_size {}",
                   prefix="does not divide: ")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    global_batch: int
    accumulation: int  # micro-batches per optimizer step on one DP rank


def check_model(shape: ModelShape, tp: int, pp: int, names: Names = RUN_NAMES, model: str = "the model") -> None:
    """TP and PP against the model's heads, key/value groups, FFN width and layers."""
    for what, n, knob, by in (("attention heads", shape.heads, names.tp, tp),
                              ("key/value groups", shape.kv_groups, names.tp, tp),
                              ("ffn width", shape.ffn, names.tp, tp),
                              ("transformer layers", shape.layers, names.pp, pp)):
        if n % by:
            raise ConfigError(f"{names.prefix}{knob.format(by)} does not divide the {n} {what} of {model}")


def check_layout(shape: ModelShape | None, tp: int, pp: int, world_size: int, micro: int, global_batch: int | None,
                 names: Names = RUN_NAMES, model: str = "the model", world: str | None = None) -> Layout:
    """The layout, or a ConfigError naming the rule it breaks. ``shape`` None: the model is not
    known yet (its rules are checked when it is); ``global_batch`` None: micro x dp;
    ``world``: how errors describe the world (default "the world size N")."""
    if shape is not None:
        check_model(shape, tp, pp, names, model)
    if world_size % (tp * pp):
        what = world or f"the world size {world_size}"
        raise ConfigError(f"{names.prefix}{names.tp_pp.format(tp, pp)} = {tp * pp} does not "
                          f"divide {what}")
    dp = world_size // (tp * pp)
    global_batch = micro * dp if global_batch is None else global_batch
    if global_batch % (micro * dp):
        raise ConfigError(f"{names.prefix}{names.global_batch.format(global_batch)} is not a multiple of "
                          f"{names.micro.format(micro)} x dp {dp} = {micro * dp}")
    return Layout(tp, pp, dp, global_batch, global_batch // (micro * dp))
