"""Predicted step time of a planned layout: FLOPs over a device's rate, bytes over the link each collective crosses.

Why: the memory model says which layouts fit; choosing among them needs their speed, and trying
them needs the machines. ``step_time`` turns a ``planner.Plan`` (its ``Comm`` bytes per stage) and
a few ``Rates`` into seconds per optimizer step, term by term, so a search can rank 100s of
layouts in milliseconds and name what bounds each. Pure arithmetic, no torch.

Compute, per micro-batch of b x s tokens on one rank, for a transformer layer's TP shard with W
matmul weight elements (qkv, proj, fc1, fc2) and h/tp of the attention width:

    forward    2Wbs + 4bs^2 h/tp    (the linears; QK^T and AV)
    backward   2Wbs + 8bs^2 h/tp    (input gradients only: a frozen weight gets no weight gradient)
    recompute  the forward again    (full activation checkpointing)

i.e. 4N FLOPs per trained token (6N with recompute) for the stage's N matmul weights, plus the
attention's, at ``Rates.flops``: the model FLOP/s a device achieves on a whole layer (these FLOPs
over the layer's time, so its norms, nonlinearities and kernel overheads are in the rate, as in a
model-FLOPs utilisation). Not counted, assumed small: the embedding lookup and splice, the head over
the K candidates (2bhK), the prompt encoder and its AdamW (stage 0, once per step).

Communication: each collective costs ``latency`` + bytes / bandwidth, the bytes being the plan's
(what one rank sends; see ``planner``'s docstring) and the bandwidth the link the group crosses:
``intra`` when all its ranks are on one node, else ``inter`` (a ring is as slow as its slowest hop).
Ranks follow megatron's order, rank = tp_rank + tp (dp_rank + dp stage) (``memory.rank_coords``):
TP groups are consecutive ranks, DP groups stride tp, a PP send goes tp x dp ranks up; node =
rank // gpus_per_node. Calls per micro-batch, for the latency: TP 4 per layer (+2 with recompute),
+1 on stage 0 (the splice), +1 on the last (the head); ZeRO-3 one all-gather per module holding
weights (6 in a layer) for the forward and again for the backward; PP one send per direction. Per
step: ZeRO-3 one gather per module outside the layers; DP one all-reduce (the prompt gradient).
Under ``zero3_gather="step"`` (``Plan.zero3_gather``) every module is gathered once a step and held:
no per-micro-batch gathers, the layers' bytes and calls in the once-a-step term.
A ZeRO-3 gather also costs the device a copy of the gathered tensor (DeepSpeed gathers into a flat
buffer, then copies each weight out: gathered bytes / ``copy``) and ``zero3_call`` per module of
framework work (DeepSpeed's Python fetch and release: 1.3-2.4 ms measured on this CPU, small on a GPU host).

Overlap: none by default. On gloo (this project's CPU runs) every collective blocks its rank:
DeepSpeed's ``overlap_comm`` is off in ds_configs/zero3.json and megatron's p2p sends are blocking.
``Rates.overlap`` hides that fraction of the ZeRO-3 gathers and PP sends behind compute (NCCL with
prefetch on GPUs); TP all-reduces stay exposed (they sit between dependent matmuls), and so do the
device's own copies.

Pipeline (1F1B, not interleaved): with t_s the per-micro-batch time of stage s (compute and its
exposed communication) and m micro-batches per step, the pipeline takes sum_s t_s + (m-1) max_s t_s;
for equal stages (m+p-1) t, of which the bubble is (p-1)/(m+p-1). The once-per-step terms follow it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ptuning_dist.errors import ConfigError
from ptuning_dist.planning.layout import PLAN_NAMES
from ptuning_dist.planning.memory import _global_params, _layer_params
from ptuning_dist.planning.planner import Plan, plan
from ptuning_dist.planning.shape import ModelShape

GB = 1e9  # bandwidth flags are in GB/s (10^9 bytes/s, as links are quoted); TFLOP/s are 10^12 FLOP/s


@dataclass(frozen=True)
class Rates:
    """What one device sustains. Defaults: an A100-80GB node (``cli/plan.py`` documents why)."""

    flops: float = 160e12  # model FLOP/s per device on a whole layer (matmuls and the rest), backbone's dtype
    intra: float = 200 * GB  # bytes/s one rank sends to ranks of its own node (NVLink; CPU: shared memory)
    inter: float = 25 * GB  # bytes/s one rank sends to other nodes (its share of the node's NICs)
    latency: float = 20e-6  # seconds every collective call costs whatever its size
    overlap: float = 0.0  # fraction of ZeRO-3 gathers and PP sends hidden behind compute (gloo: 0)
    copy: float = 1000 * GB  # bytes/s a device copies within its memory (ZeRO-3 copies each gathered weight)
    zero3_call: float = 0.0  # seconds of framework work per ZeRO-3 module gather (fetch, copy-out, release)

    def __post_init__(self):
        for name in ("flops", "intra", "inter", "copy"):
            if not getattr(self, name) > 0:
                raise ValueError(f"rate {name} must be > 0, got {getattr(self, name)!r}")
        if not (self.latency >= 0 and self.zero3_call >= 0) or not 0 <= self.overlap <= 1:
            raise ValueError(f"latency {self.latency!r} and zero3_call {self.zero3_call!r} must be >= 0, "
                             f"overlap {self.overlap!r} in [0, 1]")


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by term; the per-micro-batch terms are the critical stage's."""

    compute: float  # m x the critical stage's FLOP time, recompute included
    tp: float  # its TP all-reduces
    zero3: float  # its exposed ZeRO-3 gathers (per micro-batch and once per step)
    pp: float  # its exposed PP sends
    dp: float  # the prompt-gradient all-reduce (stage 0)
    bubble: float  # the pipeline's fill and drain: sum_s t_s - max_s t_s
    tokens: int  # tokens per optimizer step (global batch x seq_len)
    stage: int  # the critical (slowest) stage
    links: str  # which groups cross nodes, e.g. "tp intra, dp inter, pp inter"

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.zero3 + self.pp + self.dp + self.bubble

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total

    @property
    def bottleneck(self) -> str:
        terms = {"compute": self.compute, "TP all-reduce": self.tp, "ZeRO-3 gather": self.zero3,
                 "PP send": self.pp, "DP all-reduce": self.dp, "pipeline bubble": self.bubble}
        return max(terms, key=terms.get)


def matmul_params(plan: Plan) -> int:
    """W: one transformer layer's matmul weight elements on one TP rank (2-D weights: qkv, proj, fc1, fc2)."""
    return sum(_numel(s) for _, s, _ in _layer_params(plan.shape, plan.tp) if len(s) == 2)


def layer_flops(plan: Plan) -> tuple[float, float]:
    """(forward, backward) FLOPs of one layer for one micro-batch on one rank (module docstring)."""
    b, s, h = plan.micro_batch, plan.seq_len, plan.shape.heads * plan.shape.head_dim  # the attention's width
    linear, attn = 2 * matmul_params(plan) * b * s, 4 * b * s * s * h / plan.tp
    return linear + attn, linear + 2 * attn


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _modules(params) -> int:
    """Modules holding weights (ZeRO-3 gathers module by module)."""
    return len({name.rsplit(".", 1)[0] for name, _, _ in params})


def _spans(first: int, stride: int, n: int, g: int) -> bool:
    """Whether ranks first, first + stride, ... (n of them) lie on more than one node of g ranks."""
    return first // g != (first + stride * (n - 1)) // g


def crossings(plan: Plan) -> dict[str, bool]:
    """Per kind of group, whether any of its groups spans nodes (the slowest group sets the pace)."""
    tp, pp, dp, g = plan.tp, plan.pp, plan.dp, plan.gpus_per_node
    return {"tp": any(_spans(tp * k, 1, tp, g) for k in range(dp * pp)),
            "dp": any(_spans(t + tp * dp * s, tp, dp, g) for t in range(tp) for s in range(pp)),
            "pp": any(_spans(r, tp * dp, 2, g) for r in range(tp * dp * (pp - 1)))}


def step_time(plan: Plan, rates: Rates = Rates()) -> StepTime:
    """The plan's predicted seconds per optimizer step (module docstring)."""
    m, pp, shape = plan.micro_batches, plan.pp, plan.shape
    cross = crossings(plan)
    bw = {k: rates.inter if c else rates.intra for k, c in cross.items()}
    per_stage = shape.layers // pp
    fwd, bwd = layer_flops(plan)
    ckpt = plan.checkpointing
    compute = per_stage * (fwd + bwd + ckpt * fwd) / rates.flops
    zero3 = plan.zero_stage == 3 and plan.dp > 1
    layer_numel = sum(_numel(s) for _, s, _ in _layer_params(shape, plan.tp))
    # the layers' gathered bytes a step: every micro-batch's forward and backward ('layer'), or once ('step')
    per_step = plan.zero3_gather == "step"
    layer_gather = ((plan.dp - 1) * (1 if per_step else 2 * m) * per_stage * layer_numel * plan.dtype_bytes
                    // plan.dp if zero3 else 0)
    micro_gather = 0 if per_step else layer_gather / m  # per micro-batch; 'step': all in the once-a-step term
    exposed, lat = 1 - rates.overlap, rates.latency
    z_lat = lat + rates.zero3_call  # a ZeRO-3 module gather: the collective and the framework's work around it
    # the device copies every gathered byte once more (out of the flat all-gather buffer): received x dp/(dp-1)
    z_copy = plan.dp / (plan.dp - 1) / rates.copy if zero3 else 0.0
    per_micro, once = [], []  # per stage: (compute, tp, zero3, pp) per micro-batch; (zero3, dp) per step
    for s in range(pp):
        row = next(r for r in plan.stages if r.first <= s <= r.last)
        c = row.comm
        tp_calls = (plan.tp > 1) * (per_stage * (6 if ckpt else 4) + (s == 0) + (s == pp - 1))
        layer_modules = zero3 * per_stage * _modules(_layer_params(shape, plan.tp))
        z_calls = 0 if per_step else 2 * layer_modules
        p_calls = (s > 0) + (s < pp - 1)
        per_micro.append((compute,
                          c.tp_allreduce / m / bw["tp"] + tp_calls * lat,
                          exposed * (micro_gather / bw["dp"] + z_calls * z_lat) + micro_gather * z_copy,
                          exposed * (c.pp_send / m / bw["pp"] + p_calls * lat)))
        outside = _global_params(shape, plan.tp, pp, s)
        # once a step: the weights outside the layers (and under 'step' the layers' too)
        z_rest = c.zero3_gather if per_step else c.zero3_gather - layer_gather
        z_once_calls = zero3 * _modules(outside) + (layer_modules if per_step else 0)
        once.append((exposed * (z_rest / bw["dp"] + z_once_calls * z_lat) + z_rest * z_copy,
                     (c.dp_allreduce / bw["dp"] + lat) if s == 0 and plan.dp > 1 else 0.0))
    t = [sum(x) for x in per_micro]
    crit = max(range(pp), key=lambda s: t[s])
    z_once = max(x[0] for x in once)
    return StepTime(compute=m * per_micro[crit][0], tp=m * per_micro[crit][1],
                    zero3=m * per_micro[crit][2] + z_once, pp=m * per_micro[crit][3], dp=once[0][1],
                    bubble=sum(t) - t[crit], tokens=plan.global_batch * plan.seq_len, stage=crit,
                    links=", ".join(f"{k} {'inter' if cross[k] else 'intra'}" for k in ("tp", "dp", "pp")
                                    if {"tp": plan.tp, "dp": plan.dp, "pp": plan.pp}[k] > 1) or "one rank")


@dataclass(frozen=True)
class Searched:
    """What ``search`` found: the fitting layouts, fastest first, and how many were tried."""

    fitting: list[tuple[Plan, StepTime]]
    tried: int  # (tp, pp, checkpointing) combinations
    divide: int  # of those, layouts that pass ``check_layout`` (and the planner's input checks)
    closest: Plan | None  # when none fits: the layout needing the least memory


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(shape: ModelShape, nodes: int, gpus_per_node: int, rates: Rates = Rates(), *, tps=None, pps=None,
           checkpointing=(False, True), accumulation: int | None = None, **plan_kw) -> Searched:
    """Every tp (a divisor of gpus_per_node: TP stays within a node) x pp (a divisor of the layers) x
    activation checkpointing, dp = world / (tp x pp), planned with ``plan_kw`` (ZeRO stage, dtype,
    micro and global batch, ... as given); the layouts that divide and fit, by tokens/s. ``tps`` /
    ``pps``: only these. ``accumulation`` with no global batch: global = micro x accumulation x dp.
    Layouts that do not divide are skipped; any other ConfigError (a bad input: it would hold for
    every layout) is raised, and so is one naming the first rule broken when no layout divides."""
    world = nodes * gpus_per_node
    fitting, tried, divide, closest, first_error = [], 0, 0, None, None
    for tp in tps or divisors(gpus_per_node):
        for pp in pps or divisors(shape.layers):
            for ckpt in checkpointing:
                tried += 1
                kw = dict(plan_kw)
                if kw.get("global_batch") is None and accumulation is not None and world % (tp * pp) == 0:
                    kw["global_batch"] = kw.get("micro_batch", 1) * accumulation * (world // (tp * pp))
                try:
                    p = plan(shape, nodes, gpus_per_node, tp, pp, checkpointing=ckpt, **kw)
                except ConfigError as e:
                    if not str(e).startswith(PLAN_NAMES.prefix):
                        raise
                    first_error = first_error or e
                    continue
                divide += 1
                if p.fits:
                    fitting.append((p, step_time(p, rates)))
                elif closest is None or p.worst.total < closest.worst.total:
                    closest = p
    if not divide:
        raise ConfigError(f"--search: no tp x pp layout of the {world} GPUs divides (first: {first_error})")
    fitting.sort(key=lambda x: (-x[1].tokens_per_s, x[0].worst.total))
    return Searched(fitting, tried, divide, None if fitting else closest)
