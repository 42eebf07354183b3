"""The fixes DeepSpeed 0.19.8's ZeRO-3 needs to partition a megatron stage under megatron's 1F1B
schedule, in one place.

DeepSpeed's own PipelineEngine refuses ZeRO-2/3. A frozen backbone has no gradients to reduce, so
only its *parameters* are partitioned: a partition-only engine per stage (``parallel/zero.py``, with
its ``MegatronMPU`` adapter), megatron's schedule calling the stage module itself. What DeepSpeed
then gets wrong, and the fix for each:

- Fix 1, trace check over the DP group. At the first steps ZeRO-3 checks that every rank recorded
  the same module order, by broadcasting from global rank 0 over the whole world. Pipeline stages
  hold different modules and reach that point at different times: stage 0 waited in the broadcast
  while stage 1 waited for activations (deadlock at every PP > 1 layout). The ranks that must agree
  are the DP peers of one stage: the check runs over the DP group.
- Fix 2, backward counting per forward. ZeRO-3 counts, per module, the backwards still to come and
  releases the module's parameters when the count reaches 0, but it resets the count to 0 at every
  forward. Under 1F1B a stage runs several forwards before the first backward, so the count ended
  negative and parameters stayed gathered for good. The reset is undone: each forward adds its
  pending backwards to what is still outstanding.
- Fix 3, release after each recompute. Frozen parameters that ZeRO-3 gathers for a forward run
  inside a backward (megatron's full recompute) are tied to the module whose backward is in
  progress, and released when that module's backward ends. Here that module is megatron's
  TransformerBlock, whose end-of-backward hook never fires (megatron passes its input by keyword or
  through ``set_input_tensor``, which the hook does not see): the whole stage stayed gathered until
  the step's end (measured: every weight of the stage at the end of the backwards). A recomputed
  region's backward is complete when megatron's ``CheckpointFunction.backward`` returns, so what
  it gathered is released right there.

``PTUNING_ZERO_UNPATCHED=trace_check,backward_count,recompute_release`` (``ptuning_dist/debug.py``)
leaves the named fixes out: the regression tests use it to show that upstream still needs each one.

Each fix checks that the upstream code it changes is the one it was written against
(``PINNED``) and raises an ``UpstreamError`` otherwise; ``tests/dist/test_zero_megatron.py`` fails if
DeepSpeed changes underneath.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ptuning_dist.debug import ZERO_FIXES as FIXES  # noqa: F401 - the fixes' names, for the tests
from ptuning_dist.debug import zero_fix_enabled as enabled
from ptuning_dist.errors import UpstreamError, upstream

PINNED = "0.19.8"


def check_version() -> None:
    import deepspeed

    if deepspeed.__version__ != PINNED:
        raise UpstreamError(f"ptuning_dist.compat.deepspeed_megatron was written against DeepSpeed {PINNED}, found "
                            f"{deepspeed.__version__}: re-check its fixes (tests/dist/test_zero_megatron.py) and "
                            "re-pin")


def apply(engine, frozen: torch.nn.Module) -> None:
    """Fixes 2 and 3, on a partition-only ZeRO-3 engine over ``frozen`` (one megatron stage);
    fix 1 (``trace_check_over``) goes in before the engine is made."""
    if enabled("backward_count"):
        count_backwards_per_forward(frozen)
    if enabled("recompute_release"):
        release_after_recompute(engine.optimizer.get_param_coordinator())


def trace_check_over(group) -> None:
    """Fix 1: ZeRO-3's same-trace-on-every-rank check compares within ``group`` (the DP group).
    Set before ``deepspeed.initialize``: the first check runs at the first forward."""
    if not enabled("trace_check"):
        return
    from deepspeed.runtime.zero import partitioned_param_coordinator as coord
    from deepspeed.runtime.zero import utils

    upstream(coord.assert_ints_same_as_other_ranks in (utils.assert_ints_same_as_other_ranks,
                                                        getattr(coord, "_ptuning_patched", None)),
             "DeepSpeed's ZeRO-3 trace check is no longer utils.assert_ints_same_as_other_ranks")

    def assert_ints_same_in_group(ints: list[int]) -> None:
        lists = [None] * dist.get_world_size(group)
        dist.all_gather_object(lists, list(ints), group=group)
        if any(other != lists[0] for other in lists):
            raise RuntimeError(f"ZeRO-3 trace differs between data-parallel peers: {lists}")

    coord.assert_ints_same_as_other_ranks = coord._ptuning_patched = assert_ints_same_in_group


_RESETTING_HOOK = "_post_backward_module_hook"


def count_backwards_per_forward(module: torch.nn.Module) -> int:
    """Fix 2: wrap ZeRO-3's per-module forward pre-hook that resets the pending-backward count, so
    the count accumulates over forwards in flight. Returns how many hooks were wrapped."""
    wrapped = 0
    for m in module.modules():
        for key, hook in list(m._forward_pre_hooks.items()):
            inner = getattr(hook, "__wrapped__", hook)
            if getattr(inner, "__name__", "") != _RESETTING_HOOK:
                continue
            upstream("_register_deepspeed_module" in inner.__qualname__,
                     f"DeepSpeed's ZeRO-3 forward pre-hook {inner.__qualname__} is not the one the fix wraps")

            def counting(mod, inputs, _reset_and_count=hook):
                pending = getattr(mod, "ds_grads_remaining", 0)
                out = _reset_and_count(mod, inputs)  # sets 0, then +1 per input that requires grad
                if torch.is_grad_enabled():
                    mod.ds_grads_remaining += pending
                else:  # no backward comes for this forward (evaluation, a recompute's first pass)
                    mod.ds_grads_remaining = pending
                return out

            m._forward_pre_hooks[key] = counting
            wrapped += 1
    return wrapped


def release_after_recompute(coordinator) -> None:
    """Fix 3: when megatron's ``CheckpointFunction.backward`` returns, release the frozen
    parameters ZeRO-3 gathered for that recompute (they are attributed to the modules whose
    backward is in progress, as ``ds_recompute_parameters``)."""
    from megatron.core.tensor_parallel import random as mrandom

    mangled = "_PartitionedParameterCoordinator__"
    active = getattr(coordinator, mangled + "active_backward_submodules")
    release = getattr(coordinator, mangled + "release_param")
    fn = mrandom.CheckpointFunction.backward
    upstream = getattr(fn, "_ptuning_upstream", fn)

    def backward(ctx, *grads):
        out = upstream(ctx, *grads)  # the recomputed region's forward and backward, both done
        for owner in list(active.values()):
            gathered = list(owner.ds_recompute_parameters)
            owner.ds_recompute_parameters.clear()
            for param in gathered:
                param.ds_active_sub_modules.discard(owner.ds_id)
                if not param.ds_persist:
                    release(param)  # only if no module still uses it
        return out

    backward._ptuning_upstream = upstream
    mrandom.CheckpointFunction.backward = staticmethod(backward)
