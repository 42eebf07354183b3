"""DeepSpeed ZeRO for the frozen backbone; the prompt encoder stays outside, replicated.

Design (why not one DeepSpeed engine around everything): under a single ZeRO-3 engine the
encoder would be partitioned too (``stage3_param_persistence_threshold`` selects by size over the
whole model and cannot single out an LSTM whose matrices are as big as the backbone's), and an
LSTM under ZeRO-3 partitioning is a known failure. So:

- ``FrozenLM`` (splice + backbone + head, no trainable parameter) goes into a partition-only
  engine: ``deepspeed.initialize`` with no optimizer. At stage 3 every frozen parameter keeps
  about numel/DP elements per rank outside forward and backward; an HF model is partitioned while
  it loads (``HfDeepSpeedConfig`` before ``from_pretrained``), never materialised whole; a megatron
  stage is imported as this rank's TP/PP shard, then partitioned over its DP group (``MegatronMPU``
  below; ``compat/deepspeed_megatron.py``: the fixes DeepSpeed needs under megatron's schedule).
- What the backbone uses outside its modules' forwards (the word-embedding table for the splice,
  the candidate-only head, megatron's returned biases: ``backbone.external_weights()``) is
  registered as external parameters of ``FrozenLM``: gathered once when its forward starts.
- Those same weights are gathered ONCE per step (``held_for_step``): the splice reads the table
  in every micro-batch's forward (and at PP > 1 in each of the schedule's forwards), and ZeRO-3
  would otherwise all-gather it again each time. Holding them costs what the memory model
  already counts (``memory.py``: what lies outside the layers is gathered for the whole step).
- The forward calls ``FrozenLM`` itself (``engine.module``), never ``engine(...)``, whose
  backward bookkeeping refuses a plain ``loss.backward()``.
- The encoder and its torch AdamW live outside; its gradient is averaged over the data-parallel
  group by the trainer (see ``ptuning_dist.train.recipe``).

``MegatronMPU`` is megatron's ``parallel_state`` under the names DeepSpeed asks an ``mpu`` for.
Without it DeepSpeed partitions over the whole world, so ranks holding DIFFERENT TP shards would
gather each other's pieces into one tensor: a silent wrong answer. With it each TP/PP shard is
partitioned among its DP peers only.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from ptuning_dist.errors import upstream
from ptuning_dist.model import PTuningModel
from ptuning_dist.parallel.launch import quiet_unless_main


def hf_zero3_context(ds_cfg: dict):
    """Keep the returned object alive while loading: with it, ``from_pretrained`` partitions
    the weights across the data-parallel ranks as it reads them."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_cfg)


def shard_frozen(model: PTuningModel, ds_cfg: dict, megatron: bool = False):
    """Wrap ``model.frozen`` in a partition-only DeepSpeed engine; returns the engine. With a
    megatron backbone (this rank's TP/PP shard) the partitioning is over megatron's DP group
    (``MegatronMPU``, and ``compat.deepspeed_megatron``'s fixes for its pipeline schedule)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    frozen = model.frozen
    assert not any(p.requires_grad for p in frozen.parameters()), "FrozenLM must hold no trainable parameter"
    mpu = None
    if megatron:
        from ptuning_dist.compat import deepspeed_megatron

        deepspeed_megatron.check_version()
        mpu = MegatronMPU()
        deepspeed_megatron.trace_check_over(mpu.get_data_parallel_group())
    with quiet_unless_main():
        engine, *_ = deepspeed.initialize(model=frozen, config=ds_cfg, mpu=mpu)
    if ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        for p in frozen.backbone.external_weights():
            deepspeed.zero.register_external_parameter(frozen, p)
        if megatron:
            deepspeed_megatron.apply(engine, frozen)
        dp = engine.dp_world_size
        wrong = [(n, full, local) for n, full, local in partition_sizes(frozen) if local != -(-full // dp)]
        if wrong:  # once at start-up: a backbone left whole would silently cost DP x the memory
            raise RuntimeError(f"ZeRO-3 did not partition {len(wrong)} frozen parameters over {dp} ranks, "
                               f"e.g. {wrong[0][0]}: {wrong[0][2]} of {wrong[0][1]} elements held")
    return engine


_HOLD = -0x5EED  # a submodule id no module has (DeepSpeed numbers modules from 0)


def held_for_step(engine, params: list):
    """A context in which ZeRO-3 ``params`` are gathered once on entry and stay gathered until
    exit, whatever the forwards and backwards inside gather and release; re-partitioned on exit.
    A no-op without a ZeRO-3 engine.

    How: ``deepspeed.zero.GatheredParameters`` gathers them; ZeRO-3's coordinator would still
    release them at the end of FrozenLM's forward (it does not look at that context), but it
    frees a parameter only when no submodule holds it (``ds_active_sub_modules`` empty), so the
    context holds them under an id no module has. Relies on DeepSpeed internals (pinned 0.19.8);
    the gather count per step is tested (``tests/dist/test_distributed.py``)."""
    if engine is None or not params:
        return nullcontext()
    upstream(all(hasattr(p, "ds_active_sub_modules") for p in params),
             "DeepSpeed's ZeRO-3 parameters have no ds_active_sub_modules (the step's gather-and-hold needs it)")
    return _held(params)


@contextmanager
def _held(params):
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in params:
            p.ds_active_sub_modules.add(_HOLD)
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(_HOLD)


def choose_gather(mode: str, frozen: torch.nn.Module, cfg, model_dir, device, encoder_numel: int,
                  pp_stage: int, offload: bool = False) -> tuple[str, str]:
    """``parallel.zero3_gather`` resolved for this rank's stage: ('step' or 'layer', why). 'auto'
    asks the memory model (``planning/memory.py``) for the step peak with the whole stage gathered:
    the frozen bytes held and gathered counted from the partitions themselves, activations and the
    encoder from the model's shape; 'step' if that fits 80% of the device's memory (CUDA: the
    device's total; CPU: the host's MemTotal over the node's ranks). A family without a memory
    model (no megatron layout) stays at 'layer', and so does ``offload`` (offload_param: the user
    keeps the frozen weights off the device; 'step' would bring them all back for the step). Once
    at set-up: host queries are fine here."""
    if mode != "auto":
        return mode, f"parallel.zero3_gather = {mode}"
    if offload:
        return "layer", "zero3_gather auto -> layer (offload_param: the frozen weights stay off the device)"
    from ptuning_dist.planning.memory import activation_bytes
    from ptuning_dist.planning.shape import ModelShape

    if model_dir is None:
        return "layer", "zero3_gather auto -> layer (no model directory for the memory model)"
    held = gathered = 0
    for p in frozen.parameters():
        held += p.ds_tensor.numel() * p.ds_tensor.element_size()
        gathered += (p.ds_numel - p.ds_tensor.numel()) * p.ds_tensor.element_size()
    try:
        shape = ModelShape.from_hf_config(model_dir)
    except (ValueError, OSError) as e:
        return "layer", f"zero3_gather auto -> layer (no memory model for {model_dir}: {e})"
    par, t, size = cfg.parallel, cfg.train, next(frozen.parameters()).ds_tensor.element_size()
    micro_batches = t.global_batch_size // t.micro_batch_size  # an upper bound on the 1F1B in-flight count
    act = activation_bytes(shape, par.tp, par.pp, pp_stage, t.micro_batch_size, cfg.data.max_seq_len, size,
                           par.activation_checkpointing, micro_batches)
    enc = 20 * encoder_numel  # fp32 parameters, AdamW's moments, gradients, the update's temporary
    need, budget = held + gathered + act + enc, int(0.8 * device_memory(device))
    choice = "step" if need <= budget else "layer"
    return choice, (f"zero3_gather auto -> {choice}: the step with the stage gathered needs {need / 2**30:.2f} GiB "
                    f"of the {budget / 2**30:.2f} GiB budget (80% of the device)")


def device_memory(device) -> int:
    """Bytes one rank may use: a CUDA device's total, or the host's MemTotal over the local ranks."""
    import os

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def partition_sizes(module: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(name, full numel, elements held on this rank) for every parameter: ZeRO-3 partitions
    (``ds_tensor``), FSDP2 shards (DTensor ``to_local()``) or whole tensors."""
    out = []
    for name, p in module.named_parameters():
        full = getattr(p, "ds_numel", p.numel())
        if hasattr(p, "ds_tensor"):
            local = p.ds_tensor.numel()
        elif hasattr(p, "to_local"):
            local = p.to_local().numel()
        else:
            local = p.numel()
        out.append((name, full, local))
    return out


class MegatronMPU:
    """megatron-core's process groups as DeepSpeed's ``mpu`` ("model parallel" = tensor parallel,
    as Megatron-DeepSpeed defines it)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.ps.get_data_parallel_group())

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()
