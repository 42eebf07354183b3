"""Per-rank memory of a TP x PP x DP layout, predicted from the model's shape alone.

Why: choosing a layout for a 20B or 530B backbone must not need the machines to try it. This
module says, for every rank (pp_stage, tp_rank, dp_rank), which frozen parameters it holds and how
many of their elements (the megatron backbone's exact layout, checked name by name against
``ptuning_dist.parallel.zero.partition_sizes`` of real runs in the dist tests), what the
replicated prompt encoder and its AdamW cost, and an activation estimate. It is pure arithmetic:
no torch.distributed, no megatron import, so a dry-run planner can call it for 1000s of layouts.
A family's layer is described by its ``LayerStyle`` (``planning/shape.py``), not by code here.

The layout (the contract with ``ptuning_dist.backbone.megatron_import`` and the family files):
- stage s of pp holds transformer layers [s L/pp, (s+1) L/pp), named ``decoder.layers.{local i}``;
- column-parallel weights (qkv, fc1) split rows over TP, row-parallel ones (proj, fc2) columns,
  norms and row-parallel biases are replicated; the vocabulary is padded (``shape.padded_vocab``);
- stage 0 holds the word embeddings (and GPT-2's learned positions, replicated over TP); the last
  stage the final norm and, when pp > 1 or the model is untied, ``output_layer.weight`` (for a tied
  model at pp > 1 a real copy of the word embeddings);
- DP partitioning of every frozen parameter: 'zero3' ceil(numel/dp) elements on every rank,
  'fsdp2' rank r's chunk of torch.chunk(dim 0, dp), 'none' all of it.
Global rank -> coordinates follows megatron's default order "tp-cp-ep-dp-pp":
rank = tp_rank + tp * (dp_rank + dp * pp_stage).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod

from ptuning_dist.planning.layout import check_model
from ptuning_dist.planning.shape import ModelShape

PARTITIONINGS = ("none", "zero3", "fsdp2")


def encoder_params(kind: str, n_prompt: int, hidden: int) -> int:
    """The prompt encoder's parameter count, from the module itself (built on the meta device;
    imports torch on first use)."""
    from ptuning_dist.prompt.encoder import num_params

    return num_params(kind, n_prompt, hidden)


@dataclass(frozen=True)
class FrozenParam:
    """One frozen parameter on one rank: its TP/PP shard's shape and the elements held after DP."""

    name: str  # megatron name, without the module prefix
    shape: tuple[int, ...]  # on this TP/PP shard
    tp_split: bool  # False: replicated over TP (norms, row-parallel biases, positions)
    held: int  # elements held after DP partitioning

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass
class RankMemory:
    """Predicted bytes on one rank. ``step_bytes`` is the training-step peak; ``load_bytes`` the
    set-up peak of the shard-wise load (what the rank holds plus the slices in flight); both
    exclude the runtime."""

    pp_stage: int
    tp_rank: int
    dp_rank: int
    frozen: list[FrozenParam] = field(default_factory=list)
    frozen_bytes: int = 0  # frozen elements held x dtype bytes
    encoder_bytes: int = 0  # fp32 encoder + AdamW moments (+ grads and the update's temporary: step peak)
    activation_bytes: int = 0
    gather_bytes: int = 0  # DP-partitioned weights gathered for compute (0 without partitioning)
    load_bytes: int = 0

    @property
    def step_bytes(self) -> int:
        return self.frozen_bytes + self.encoder_bytes + self.activation_bytes + self.gather_bytes


def _layer_params(m: ModelShape, tp: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """One transformer layer's (name, TP-shard shape, tp_split) in megatron's registration order."""
    h, f, hd, st = m.hidden, m.ffn // tp, m.head_dim, m.style
    qkv_rows_tp = (m.heads + 2 * m.kv_groups) * hd // tp
    fc1_rows_tp = 2 * f if st.gated_mlp else f  # [gate; up], each split over TP
    out = [("input_layernorm.weight", (h,), False)]
    out += [("input_layernorm.bias", (h,), False)] * st.norm_bias
    out += [("self_attention.linear_proj.weight", (h, m.heads * hd // tp), True)]
    out += [("self_attention.linear_proj.bias", (h,), False)] * st.linear_bias
    out += [("self_attention.linear_qkv.weight", (qkv_rows_tp, h), True)]
    out += [("self_attention.linear_qkv.bias", (qkv_rows_tp,), True)] * st.linear_bias
    out += [("pre_mlp_layernorm.weight", (h,), False)]
    out += [("pre_mlp_layernorm.bias", (h,), False)] * st.norm_bias
    out += [("mlp.linear_fc1.weight", (fc1_rows_tp, h), True)]
    out += [("mlp.linear_fc1.bias", (fc1_rows_tp,), True)] * st.linear_bias
    out += [("mlp.linear_fc2.weight", (h, f), True)]
    out += [("mlp.linear_fc2.bias", (h,), False)] * st.linear_bias
    return out


def _global_params(m: ModelShape, tp: int, pp: int, stage: int | None = None):
    """The non-layer parameters of ``stage`` in registration order; with ``stage`` None, the whole
    model's as Hugging Face has them (a tied head is no parameter of its own, the vocabulary is not
    padded)."""
    first, last = stage in (None, 0), stage in (None, pp - 1)
    vocab_tp, h = (m.vocab if stage is None else m.padded_vocab(tp)) // tp, m.hidden
    out = []
    if first:
        out.append(("embedding.word_embeddings.weight", (vocab_tp, h), True))
        if m.style.learned_positions:
            out.append(("embedding.position_embeddings.weight", (m.max_positions, h), False))
    if last:
        out.append(("decoder.final_layernorm.weight", (h,), False))
        if m.style.norm_bias:
            out.append(("decoder.final_layernorm.bias", (h,), False))
        if not m.tied_embeddings or (pp > 1 and stage is not None):
            out.append(("output_layer.weight", (vocab_tp, h), True))
    return out


def full_depth_numel(m: ModelShape, tp: int) -> int:
    """Elements of one TP rank's shard of the whole model as Hugging Face has it (all layers, no
    pipeline cut, no vocabulary padding)."""
    return (sum(prod(s) for _, s, _ in _layer_params(m, tp)) * m.layers
            + sum(prod(s) for _, s, _ in _global_params(m, tp, 1)))


def dp_held(shape: tuple[int, ...], dp: int, dp_rank: int, partitioning: str) -> int:
    """Elements of a ``shape`` tensor that DP rank ``dp_rank`` holds outside forward/backward."""
    numel = prod(shape)
    if partitioning == "none":
        return numel
    if partitioning == "zero3":
        return -(-numel // dp)
    if partitioning == "fsdp2":  # torch.chunk over dim 0: ceil(rows/dp) rows a chunk, trailing ranks may hold 0
        rows, chunk = shape[0], -(-shape[0] // dp)
        return max(0, min(rows, (dp_rank + 1) * chunk) - dp_rank * chunk) * (numel // rows)
    raise ValueError(f"partitioning {partitioning!r} is not one of {PARTITIONINGS}")


def rank_coords(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """Global rank -> (pp_stage, tp_rank, dp_rank), megatron's default order."""
    if not 0 <= rank < tp * pp * dp:
        raise ValueError(f"rank {rank} outside a world of tp*pp*dp = {tp * pp * dp}")
    return rank // (tp * dp), rank % tp, rank // tp % dp


def stage_params(m: ModelShape, tp: int, pp: int, dp: int, pp_stage: int, dp_rank: int = 0,
                 partitioning: str = "none") -> list[FrozenParam]:
    """Every frozen parameter of one rank, in the order ``named_parameters()`` lists them."""
    check_model(m, tp, pp)
    per_stage = m.layers // pp
    glob = _global_params(m, tp, pp, pp_stage)
    table = [g for g in glob if g[0].startswith("embedding.")]
    table += [(f"decoder.layers.{i}.{n}", s, t) for i in range(per_stage) for n, s, t in _layer_params(m, tp)]
    table += [g for g in glob if not g[0].startswith("embedding.")]
    return [FrozenParam(n, s, t, dp_held(s, dp, dp_rank, partitioning)) for n, s, t in table]


def predicted_partitions(m: ModelShape, tp: int, pp: int, dp: int, rank: int, partitioning: str = "none",
                         prefix: str = "backbone.gpt.") -> list[tuple[str, int, int]]:
    """Global rank ``rank``'s (name, numel on its TP/PP shard, elements held) in the form of
    ``partition_sizes(model.frozen)`` (whose names start with ``backbone.gpt.``)."""
    stage, _, dp_rank = rank_coords(rank, tp, pp, dp)
    return [(prefix + p.name, p.numel, p.held) for p in stage_params(m, tp, pp, dp, stage, dp_rank, partitioning)]


def activation_bytes(m: ModelShape, tp: int, pp: int, pp_stage: int, micro_batch: int, seq_len: int,
                     dtype_bytes: int, checkpointing: bool, micro_batches: int | None = None) -> int:
    """Activations alive at the peak of a step on one rank (an estimate, b = micro_batch, s = seq_len).

    The backbone is frozen, so megatron's frozen-weight linears save only their weight (not their
    input) and what one layer keeps for the input gradient is, in elements:

        saved = s*b*(2h + (2a + 2g)*d + k*f) + b*a*s

    with a = heads/tp, g = kv_groups/tp, d = head_dim, f = ffn/tp: the two norm inputs (2h); q, k,
    v and the attention's output ((2a + 2g)*d); the MLP's nonlinearity (k = 1: GELU's input; a gated
    MLP k = 3: fc1's [gate|up] output and SiLU's output); the fused attention's log-sum-exp (b*a*s).
    Fused attention (SDPA: the hf backend's, and the megatron backend's ``SDPAttention``) keeps no
    s x s tensor; megatron's own ``DotProductAttention`` (its fallbacks: dropout in training, ...)
    would keep the softmax output, b*a*s*s more.
    Without checkpointing a stage keeps ``saved`` for each of its layers, plus its input (s*b*h),
    plus one layer's gradients (bounded by ``saved``); with checkpointing only the layer inputs
    (s*b*h each) and its input, plus one layer recomputed and its gradients (2 x saved). Under 1F1B,
    stage ``pp_stage`` holds min(pp - pp_stage, micro_batches) micro-batches in flight.
    """
    h, a, g, d, f = m.hidden, m.heads // tp, m.kv_groups // tp, m.head_dim, m.ffn // tp
    k = 3 if m.style.gated_mlp else 1
    s, b = seq_len, micro_batch
    saved = s * b * (2 * h + (2 * a + 2 * g) * d + k * f) + b * a * s
    layers = m.layers // pp
    in_flight = min(pp - pp_stage, micro_batches or pp - pp_stage)
    if checkpointing:
        elements = in_flight * (layers + 1) * s * b * h + 2 * saved
    else:
        elements = in_flight * (layers * saved + s * b * h) + saved
    return elements * dtype_bytes


def layout_memory(m: ModelShape, tp: int = 1, pp: int = 1, dp: int = 1, *, dtype_bytes: int = 4,
                  partitioning: str = "none", n_prompt: int = 6, encoder: str = "lstm", micro_batch: int = 8,
                  seq_len: int = 128, checkpointing: bool = False, micro_batches: int | None = None,
                  backend: str = "megatron", prompt_groups: int = 1) -> list[RankMemory]:
    """Predicted memory of every rank, in global rank order (``stage_memory`` of each rank's stage
    and DP rank; TP ranks hold the same sizes, and so do DP ranks unless partitioning is 'fsdp2')."""
    kw = dict(dtype_bytes=dtype_bytes, partitioning=partitioning, n_prompt=n_prompt, encoder=encoder,
              micro_batch=micro_batch, seq_len=seq_len, checkpointing=checkpointing, micro_batches=micro_batches,
              backend=backend, prompt_groups=prompt_groups)
    cache: dict[tuple[int, int], RankMemory] = {}
    out = []
    for rank in range(tp * pp * dp):
        stage, tp_rank, dp_rank = rank_coords(rank, tp, pp, dp)
        key = (stage, dp_rank if partitioning == "fsdp2" else 0)
        if key not in cache:
            cache[key] = stage_memory(m, tp, pp, dp, stage, key[1], **kw)
        out.append(replace(cache[key], tp_rank=tp_rank, dp_rank=dp_rank))
    return out


def stage_memory(m: ModelShape, tp: int, pp: int, dp: int, pp_stage: int, dp_rank: int = 0, *,
                 dtype_bytes: int = 4, partitioning: str = "none", n_prompt: int = 6, encoder: str = "lstm",
                 micro_batch: int = 8, seq_len: int = 128, checkpointing: bool = False,
                 micro_batches: int | None = None, backend: str = "megatron", prompt_groups: int = 1,
                 zero3_gather: str = "layer") -> RankMemory:
    """Predicted memory of the ranks of stage ``pp_stage`` at DP rank ``dp_rank`` (any TP rank): what
    a planner calls once per stage instead of once per rank.

    Encoder (stage 0 only, replicated over TP and DP; fp32): n = ``encoder_params`` parameters per
    prompt group (``prompt_groups`` G of ``n_prompt`` slots each: one encoder per LAMA relation or
    task, prompt/batched.py), times G, 12n bytes always alive (parameters and AdamW's two moments) + 8n at the update (gradients and the
    multi-tensor AdamW's sqrt temporary). Gathers ('zero3'/'fsdp2', dp > 1): what the stage holds
    outside its layers (embeddings, final norm, head) gathered for the whole step, plus three layers'
    worth (the layer computing, the one prefetched, the flat all-gather buffer; two on a one-layer
    stage); with ``zero3_gather="step"`` the whole stage gathered for the step. Load (``megatron_import.build_stage``, ``parallel/shardwise.py``): the shard-wise loader
    allocates what it will hold and fills it tensor by tensor, reading only this rank's slice of
    each, in ``dtype_bytes``: held + in flight. Held: the megatron backend imports the whole TP/PP
    stage, then ZeRO-3/FSDP2 partition it parameter by parameter (``backend="megatron"``: the stage's
    elements); the hf backend fills its DP partitions straight from the files (``backend="hf"``:
    the elements held after DP). In flight: the largest tensor's slice twice (read, then regrouped
    or cast into place: LLaMA's q/k/v per group, GPT-2's transposes).
    """
    params = stage_params(m, tp, pp, dp, pp_stage, dp_rank, partitioning)
    r = RankMemory(pp_stage, 0, dp_rank, params, sum(p.held for p in params) * dtype_bytes)
    r.encoder_bytes = 20 * prompt_groups * encoder_params(encoder, n_prompt, m.hidden) if pp_stage == 0 else 0
    r.activation_bytes = activation_bytes(m, tp, pp, pp_stage, micro_batch, seq_len, dtype_bytes, checkpointing,
                                          micro_batches)
    if partitioning != "none" and dp > 1:
        layer = sum(prod(s) for _, s, _ in _layer_params(m, tp))
        outside = sum(p.numel - p.held for p in params if not p.name.startswith("decoder.layers."))
        r.gather_bytes = (outside + min(3, m.layers // pp + 1) * layer) * dtype_bytes
        if zero3_gather == "step":  # parallel.zero3_gather: the stage's every weight, for the whole step
            r.gather_bytes = sum(p.numel - p.held for p in params) * dtype_bytes
    held = sum(p.held if backend == "hf" else p.numel for p in params)
    in_flight = 2 * max(p.held if backend == "hf" else p.numel for p in params)
    r.load_bytes = (held + in_flight) * dtype_bytes
    return r
