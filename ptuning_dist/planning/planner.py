"""Dry-run planner: per-rank memory, communication per step and a verdict for a TP x PP x DP layout.

Why: sizing a 20B-530B backbone's layout must not need the machines. ``plan`` checks that the
layout divides (every rule named with its numbers), then computes, once per pipeline stage (the
TP ranks of a stage and, under ZeRO-3's ceil(numel/dp), its DP ranks hold the same sizes), the
memory model's bytes (``ptuning_dist.planning.memory.stage_memory``: frozen weights after
TP/PP/ZeRO-3, encoder and AdamW, activations with and without checkpointing, ZeRO-3 gather
buffers, the importer's host peak) and the bytes each rank moves per optimizer step. Pure
arithmetic: a 530B model on 4096 GPUs plans in milliseconds. ``ptuning_dist/cli/plan.py`` prints it.

Communication, as the training step (``ptuning_dist.train.recipe``) really runs it, per optimizer step
of n_micro = global / (micro x dp) micro-batches per DP rank, b = micro, s = seq_len, h = hidden, in the
backbone's dtype unless said otherwise; each number is what one rank sends (it receives as much):

- ZeRO-3 all-gather (zero stage 3, dp > 1): each transformer layer's weights are gathered for every
  micro-batch's forward and again for its backward. With full activation checkpointing megatron
  re-runs the layer's forward inside the backward; with ``stage3_max_reuse_distance: 0``
  (ds_configs/zero3.json) we assume the backward's gather also serves the recompute, so it is 2
  gathers per layer per micro-batch with or without checkpointing (an assumption, not measured).
  The weights outside the layers (word embeddings, learned positions, final norm, head) are
  gathered once per step and held for it. A rank receives (dp-1)/dp of each gathered tensor.
- TP all-reduce (tp > 1, megatron, no sequence parallelism): per layer and micro-batch 2 in the
  forward (attention output, MLP output), 2 in the backward (input gradients), 2 more with full
  recompute, each of s*b*h; stage 0 adds one of s*b*h for the vocabulary-parallel splice, the last
  stage one for the head's logits (b x K candidates, counted as b*h). A ring all-reduce sends
  2(tp-1)/tp of the tensor per rank.
- PP send (pp > 1, 1F1B, non-interleaved, the full s*b*h tensor on every TP rank): per micro-batch a
  stage sends its output forward and its input gradient back; inner stages both, stage 0 only the
  first, the last stage only the second.
- DP all-reduce: the prompt table's gradient, n_prompt x h fp32 once per step, ring over DP, on
  stage 0 (where the encoder lives).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ptuning_dist.config import EncoderKind, choices, one_of
from ptuning_dist.errors import ConfigError
from ptuning_dist.planning.layout import PLAN_NAMES, check_layout
from ptuning_dist.planning.memory import activation_bytes, stage_memory
from ptuning_dist.planning.shape import ModelShape

GiB = 2**30


def _megatron_gpt(layers: int, hidden: int, heads: int, vocab: int, positions: int) -> ModelShape:
    """A GPT-2-style Megatron GPT: learned positions, LayerNorm with biases, ffn 4h, tied head."""
    return ModelShape("gpt2", layers, hidden, heads, heads, 4 * hidden, vocab, positions, True)


PRESETS: dict[str, ModelShape] = {
    "gpt2-xl": _megatron_gpt(48, 1600, 25, 50257, 1024),  # 1.56B
    "gpt-20b": _megatron_gpt(44, 6144, 64, 50432, 2048),  # 20.3B, GPT-NeoX-20B's width and depth
    "gpt-175b": _megatron_gpt(96, 12288, 96, 50257, 2048),  # 175B, GPT-3
    "gpt-530b": _megatron_gpt(105, 20480, 128, 51200, 2048),  # 530B, Megatron-Turing NLG
}


@dataclass(frozen=True)
class Comm:
    """Bytes one rank sends per optimizer step, by kind (and receives as many)."""

    zero3_gather: int = 0
    tp_allreduce: int = 0
    pp_send: int = 0
    dp_allreduce: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class StageRow:
    """Stages ``first``..``last`` (identical numbers): bytes on each of their ranks."""

    first: int
    last: int
    ranks: int  # ranks in these stages
    frozen: int  # frozen weights held (on the host, not the GPU, when ZeRO-3 offloads parameters)
    encoder: int  # fp32 encoder + AdamW at the update (stage 0)
    act: int  # activations at the step's peak without checkpointing
    act_ckpt: int  # ... with full activation checkpointing
    gather: int  # ZeRO-3 gather buffers
    load: int  # the importer's host peak at set-up
    comm: Comm
    checkpointing: bool
    offload: bool

    @property
    def activations(self) -> int:
        return self.act_ckpt if self.checkpointing else self.act

    @property
    def total(self) -> int:
        """The training step's peak on the GPU (runtime not included)."""
        return (0 if self.offload else self.frozen) + self.encoder + self.activations + self.gather

    @property
    def stages(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Plan:
    name: str
    shape: ModelShape
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    dtype_bytes: int
    offload: bool
    micro_batch: int
    global_batch: int
    micro_batches: int  # per step per DP rank
    seq_len: int
    n_prompt: int
    encoder: str
    checkpointing: bool
    gpu_mem_bytes: int
    reserve_bytes: int  # runtime not modelled (CUDA context, NCCL buffers, allocator slack)
    stages: list[StageRow]
    prompt_groups: int = 1  # encoders (LAMA relations / tasks), each of n_prompt slots
    zero3_gather: str = "layer"  # under ZeRO-3 at dp > 1: "layer" (gathered per module, forward and backward) or "step"

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def worst(self) -> StageRow:
        return max(self.stages, key=lambda r: r.total)

    @property
    def fits(self) -> bool:
        return self.worst.total + self.reserve_bytes <= self.gpu_mem_bytes

    @property
    def verdict(self) -> str:
        w, cap = self.worst, self.gpu_mem_bytes - self.reserve_bytes
        need = (f"{w.total / GiB:.1f} GiB (+ {self.reserve_bytes / GiB:.1f} GiB runtime reserve) of "
                f"{self.gpu_mem_bytes / GiB:.0f} GiB")
        ckpt = "with" if self.checkpointing else "without"
        if self.fits:
            return (f"fits: the fullest ranks (stage {w.stages}) need {need}, {ckpt} activation checkpointing; "
                    f"{(cap - w.total) / GiB:.1f} GiB to spare")
        over = [r for r in self.stages if r.total > cap]
        text = (f"does not fit: stage {w.stages} needs {need}, {(w.total - cap) / GiB:.1f} GiB over "
                f"(frozen {w.frozen / GiB:.1f}{' on the host' if self.offload else ''}, encoder {w.encoder / GiB:.2f}, "
                f"activations {w.activations / GiB:.1f}, gathers {w.gather / GiB:.1f}); "
                f"{sum(r.ranks for r in over)} of {self.world} ranks (stages "
                f"{', '.join(r.stages for r in over)}) exceed, {ckpt} activation checkpointing")
        if not self.checkpointing:
            ck = max(r.total - r.act + r.act_ckpt for r in self.stages)
            text += (f"; with --activation_checkpointing the fullest needs {ck / GiB:.1f} GiB"
                     + (" and it fits" if ck <= cap else ", still over"))
        return text


def _positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"--{name}: must be a positive integer, got {v!r}")


def plan_layout(shape: ModelShape, nodes: int, gpus_per_node: int, tp: int, pp: int, micro_batch: int,
                global_batch: int | None, name: str = "the model") -> tuple[int, int, int]:
    """(dp, global batch, micro-batches per step per DP rank), or ConfigError naming the rule broken
    (``planning.layout``'s rules, in the planner's flags)."""
    _positive(nodes=nodes, **{"gpus-per-node": gpus_per_node}, tp=tp, pp=pp, micro_batch_size=micro_batch)
    if global_batch is not None:
        _positive(global_batch_size=global_batch)
    world = nodes * gpus_per_node
    lay = check_layout(shape, tp, pp, world, micro_batch, global_batch, PLAN_NAMES, model=name,
                       world=f"the world of --nodes {nodes} x --gpus-per-node {gpus_per_node} = {world} GPUs")
    return lay.dp, lay.global_batch, lay.accumulation


def plan(shape: ModelShape, nodes: int, gpus_per_node: int, tp: int = 1, pp: int = 1, *, zero_stage: int = 3,
         dtype_bytes: int = 2, micro_batch: int = 1, global_batch: int | None = None, seq_len: int | None = None,
         n_prompt: int = 6, encoder: str = "lstm", gpu_mem_bytes: int = 80 * GiB, checkpointing: bool = False,
         reserve_bytes: int = 0, offload: bool = False, name: str = "the model", prompt_groups: int = 1,
         zero3_gather: str = "layer") -> Plan:
    """The plan of one layout (see the module docstring); ConfigError if it does not divide or an
    input is out of range. ``global_batch`` None: micro x dp; ``seq_len`` None: the model's positions.
    ``zero3_gather`` (``parallel.zero3_gather``): "layer", "step" (each frozen weight gathered once a
    step and held for it: 1/(2 x micro-batches) of the layers' gathered bytes, the stage's weights
    held), or "auto": "step" where that plan fits, else "layer" (as the run resolves it, by memory;
    with ``offload`` always "layer", as the run)."""
    if zero3_gather not in ("auto", "layer", "step"):
        raise ConfigError(f"--zero3_gather {zero3_gather!r} is not one of auto, layer, step")
    if zero3_gather == "auto" and offload:
        zero3_gather = "layer"
    if zero3_gather == "auto":
        kw = dict(zero_stage=zero_stage, dtype_bytes=dtype_bytes, micro_batch=micro_batch, global_batch=global_batch,
                  seq_len=seq_len, n_prompt=n_prompt, encoder=encoder, gpu_mem_bytes=gpu_mem_bytes,
                  checkpointing=checkpointing, reserve_bytes=reserve_bytes, offload=offload, name=name,
                  prompt_groups=prompt_groups)
        step = plan(shape, nodes, gpus_per_node, tp, pp, zero3_gather="step", **kw)
        return step if step.fits else plan(shape, nodes, gpus_per_node, tp, pp, zero3_gather="layer", **kw)
    dp, global_batch, n_micro = plan_layout(shape, nodes, gpus_per_node, tp, pp, micro_batch, global_batch, name)
    seq_len = shape.max_positions if seq_len is None else seq_len
    _positive(seq_len=seq_len, n_prompt=n_prompt, prompt_groups=prompt_groups)
    if shape.family == "gpt2" and seq_len > shape.max_positions:
        raise ConfigError(f"--seq_len {seq_len} exceeds the {shape.max_positions} learned positions of {name}")
    if n_prompt >= seq_len:
        raise ConfigError(f"--n_prompt {n_prompt} leaves no room in --seq_len {seq_len}")
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero stage {zero_stage!r} must be 0, 1, 2 or 3")
    if dtype_bytes not in (2, 4):
        raise ConfigError(f"dtype bytes {dtype_bytes!r} must be 2 (bf16/fp16) or 4 (fp32)")
    if offload and zero_stage != 3:
        raise ConfigError(f"offload_param needs ZeRO stage 3, not {zero_stage}")
    if encoder not in choices(EncoderKind):
        raise ConfigError(f"--encoder {encoder!r} is not {one_of(choices(EncoderKind))}")
    # ZeRO 1/2 partition gradients and optimizer states: the frozen backbone has none, so only 3 partitions it
    partitioning = "zero3" if zero_stage == 3 else "none"
    if partitioning == "none" or dp == 1:  # nothing is gathered: one mode
        zero3_gather = "layer"
    kw = dict(dtype_bytes=dtype_bytes, partitioning=partitioning, n_prompt=n_prompt, encoder=encoder,
              micro_batch=micro_batch, seq_len=seq_len, micro_batches=n_micro, prompt_groups=prompt_groups,
              zero3_gather=zero3_gather)
    sbh, d, per_stage = seq_len * micro_batch * shape.hidden, dtype_bytes, shape.layers // pp
    rows: list[StageRow] = []
    for s in range(pp):
        r = stage_memory(shape, tp, pp, dp, s, **kw)
        layer = sum(p.numel for p in r.frozen if p.name.startswith("decoder.layers.0."))
        outside = sum(p.numel for p in r.frozen if not p.name.startswith("decoder.layers."))
        comm = Comm(
            zero3_gather=((dp - 1) * ((1 if zero3_gather == "step" else 2 * n_micro) * per_stage * layer + outside)
                          * d // dp
                          if partitioning == "zero3" else 0),
            tp_allreduce=2 * (tp - 1) * d * n_micro * (per_stage * (6 if checkpointing else 4) * sbh + (s == 0) * sbh
                                                  + (s == pp - 1) * micro_batch * shape.hidden) // tp,
            pp_send=n_micro * sbh * d * ((s > 0) + (s < pp - 1)),
            dp_allreduce=2 * (dp - 1) * prompt_groups * n_prompt * shape.hidden * 4 // dp if s == 0 else 0)
        row = StageRow(s, s, tp * dp, r.frozen_bytes, r.encoder_bytes, r.activation_bytes,
                       activation_bytes(shape, tp, pp, s, micro_batch, seq_len, d, True, n_micro), r.gather_bytes,
                       r.load_bytes, comm, checkpointing, offload)
        prev = rows[-1] if rows else None
        if prev is not None and prev.last == s - 1 and _same(prev, row):  # group identical neighbours
            rows[-1] = StageRow(prev.first, s, prev.ranks + row.ranks,
                                *(getattr(row, f.name) for f in fields(StageRow)[3:]))
        else:
            rows.append(row)
    return Plan(name, shape, nodes, gpus_per_node, tp, pp, dp, zero_stage, dtype_bytes, offload, micro_batch,
                global_batch, n_micro, seq_len, n_prompt, encoder, checkpointing, gpu_mem_bytes, reserve_bytes, rows,
                prompt_groups, zero3_gather)


def _same(a: StageRow, b: StageRow) -> bool:
    return all(getattr(a, f.name) == getattr(b, f.name) for f in fields(StageRow)[3:])
