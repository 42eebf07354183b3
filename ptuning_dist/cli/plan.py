"""``ptuning-plan`` (``launchers/plan.py``): a layout's per-rank memory, communication and predicted
time per step and verdict, without any GPU; ``--search``: the fastest layouts that divide and fit.

Exit 0 when it fits (--search: when any layout fits), 1 when it does not, 2 with ``error: ...``
(naming the flag, file or rule) when the layout does not divide or an input is bad. The numbers are
``ptuning_dist.planning.planner``'s and ``planning.timing``'s (the rates: the flags, in TFLOP/s, GB/s
= 10^9 bytes/s and microseconds); no torch is imported until a plan counts the prompt encoder's
parameters.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ptuning_dist.cli import args as cli_args
from ptuning_dist.config import Dtype, EncoderKind, ZeroGather, read_json
from ptuning_dist.errors import ConfigError, PTuningError
from ptuning_dist.planning.planner import PRESETS, GiB, Plan, plan
from ptuning_dist.planning.timing import GB, Rates, StepTime, search, step_time
from ptuning_dist.planning.shape import ModelShape
from ptuning_dist.cli.common import Parser

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class PlanArgs:
    model: str
    """A preset (gpt2-xl, gpt-20b, gpt-175b, gpt-530b) or a Hugging Face config.json or model
    directory (families with a megatron layout: gpt2, llama)."""
    nodes: int = 1
    """Nodes in the cluster."""
    gpus_per_node: int = field(default=8, metadata={"flag": "gpus-per-node", "aliases": ("--gpus_per_node",)})
    """GPUs per node (world = nodes x GPUs per node)."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size; dp = world / (tp x pp)."""
    ds_config: str | None = None
    """A DeepSpeed JSON: its ZeRO stage, bf16/fp16, offload_param and numeric batch sizes."""
    zero_stage: Literal[0, 1, 2, 3] | None = None
    """ZeRO stage without --ds_config (None: 0); with it, must agree with zero_optimization.stage."""
    dtype: Dtype | None = None
    """The backbone's dtype without --ds_config (None: float32); with it, float32 or the JSON's."""
    micro_batch_size: int | None = None
    """Samples per forward per rank (None: the JSON's, else 1)."""
    global_batch_size: int | None = None
    """Samples per optimizer step (None: the JSON's, else micro x dp)."""
    seq_len: int | None = None
    """Tokens per sample, prompt included (None: the model's positions)."""
    n_prompt: int = 6
    """Prompt tokens of one group's template (its rows of the prompt table)."""
    prompt_groups: int = 1
    """Prompt groups the run trains, each its own encoder (prompt.sharing = per_group: one per LAMA
    relation or task)."""
    encoder: EncoderKind = "lstm"
    """The prompt encoder (replicated with its AdamW on every first-stage rank)."""
    gpu_mem_gb: float = 80.0
    """GPU memory in GiB (an '80 GB' A100/H100 has 80 GiB)."""
    reserve_gb: float = 2.0
    """GiB kept for what the model leaves out: CUDA context, NCCL buffers, allocator."""
    zero3_gather: ZeroGather = "auto"
    """Under ZeRO-3 at dp > 1 (the training flag of the same name): 'layer' gathers each module for
    every forward and backward; 'step' once a step, held for it; 'auto' (the run's default): 'step'
    where that layout fits, else 'layer'."""
    activation_checkpointing: bool = False
    """Plan the step with full activation checkpointing (both peaks are printed); with --search, given:
    only that setting, not given: both."""
    gpu_tflops: float = 160.0
    """Model TFLOP/s one GPU achieves on a whole transformer layer in the backbone's dtype: the layer's
    4N FLOPs a token over its time, norms and nonlinearities included (default: about half an A100's
    312 bf16 peak, as Megatron-LM's 163 a GPU at 1T parameters; an H100 SXM: ~400)."""
    intra_node_gbps: float = 200.0
    """GB/s (10^9 bytes/s) a rank sends to GPUs of its own node (default: an A100's NVLink, 300 GB/s a
    direction, of which NCCL's all-reduce reaches ~230)."""
    inter_node_gbps: float = 25.0
    """GB/s a rank sends to other nodes (default: one 200 Gb/s InfiniBand NIC per GPU, as a DGX A100)."""
    collective_latency_us: float = 20.0
    """Microseconds every collective call costs whatever its size (NCCL: ~10-30)."""
    comm_overlap: float = 0.0
    """Fraction of the ZeRO-3 gathers and PP sends hidden behind compute (default 0: nothing
    overlaps, as on gloo; TP all-reduces are never hidden)."""
    gpu_copy_gbps: float = 1000.0
    """GB/s a GPU copies within its own memory: ZeRO-3 copies every gathered weight out of its flat
    all-gather buffer (default: an A100's ~2 TB/s HBM, read plus write)."""
    zero3_fetch_us: float = 0.0
    """Microseconds of framework work per ZeRO-3 module gather beyond the collective (DeepSpeed's
    Python fetch and release; default 0: small on a GPU host, 1300-2400 measured on this CPU)."""
    search: bool = False
    """List the fastest layouts that divide and fit: every --tp dividing --gpus-per-node x every --pp
    dividing the layers (a --tp or --pp given: only it), with and without checkpointing."""
    top: int = 10
    """Layouts --search lists."""


def model_shape(spec: str) -> tuple[str, ModelShape]:
    """A preset name, or a Hugging Face config.json / model directory."""
    if spec in PRESETS:
        return spec, PRESETS[spec]
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"--model {spec!r}: neither a preset ({', '.join(PRESETS)}) "
                          "nor an existing file or directory")
    cfg = path / "config.json" if path.is_dir() else path
    if not cfg.is_file():
        raise ConfigError(f"--model {spec}: no config.json in the directory")
    data = read_json(cfg, "--model")
    try:
        shape = ModelShape.from_hf_config(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--model {cfg}: cannot read the model's shape ({e!r})") from None
    return (path.name if path.is_dir() else path.parent.name or spec), shape


def _numeric(d: dict, key: str, src: str) -> int | None:
    v = d.get(key, "auto")
    if v == "auto":
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{src}: {key} = {v!r}, expected a positive integer or \"auto\"")
    return v


def _agree(flag: str, given, key: str, found, src: str):
    """The flag's value, the JSON's, or an error if both are set and differ (as load_ds_config does)."""
    if given is not None and found is not None and given != found:
        raise ConfigError(f"{src}: {key} = {found!r} contradicts {flag} {given!r}")
    return found if given is None else given


def settings(args: PlanArgs) -> dict:
    """plan()'s keyword arguments from the flags and the DeepSpeed JSON (its numeric fields; "auto"
    ones fall back to the flags; a flag contradicting a number in the JSON is an error)."""
    zero, dtype, micro, glob, accum, offload = args.zero_stage, args.dtype, args.micro_batch_size, \
        args.global_batch_size, None, False
    if args.ds_config:
        from ptuning_dist.parallel.ds_config import ds_settings, read_ds_json

        src, d = f"--ds_config {args.ds_config}", read_ds_json(args.ds_config)
        ds = ds_settings(d, src)
        zero = _agree("--zero_stage", zero, "zero_optimization.stage", ds.stage, src)
        ds_dtype = ds.dtype
        if dtype not in (None, "float32", ds_dtype):  # the run's rule: model.dtype is float32 or the JSON's
            raise ConfigError(f"{src}: implies backbone dtype {ds_dtype}, but --dtype {dtype}")
        dtype = ds_dtype
        micro = _agree("--micro_batch_size", micro, "train_micro_batch_size_per_gpu",
                       _numeric(d, "train_micro_batch_size_per_gpu", src), src)
        glob = _agree("--global_batch_size", glob, "train_batch_size", _numeric(d, "train_batch_size", src), src)
        accum = _numeric(d, "gradient_accumulation_steps", src)
        offload = ds.offload
    return dict(zero_stage=0 if zero is None else zero, dtype_bytes=DTYPE_BYTES[dtype or "float32"],
                micro_batch=micro or 1, global_batch=glob, accumulation=accum, offload=offload)


def _gib(x: float, digits: int = 2) -> str:
    return f"{x / GiB:.{digits}f}"


def _comm(x: float) -> str:
    """GiB with 3 decimals, or in scientific notation when that would print a non-zero as 0.000."""
    return f"{x / GiB:.3f}" if x == 0 or x >= GiB / 1000 else f"{x / GiB:.1e}"


def report(p: Plan, rates: Rates = Rates()) -> list[str]:
    m, ck = p.shape, "on" if p.checkpointing else "off"
    part = {3: f"ZeRO-3: frozen weights partitioned over dp {p.dp}" + (", offloaded to the host" if p.offload else "")
            + (f", gathered per {p.zero3_gather}" if p.dp > 1 else "")}
    dtype = {2: "bf16/fp16 (2 bytes)", 4: "fp32 (4 bytes)"}[p.dtype_bytes]
    out = [f"model: {p.name}: {m.family}-style, {m.layers} layers, hidden {m.hidden}, {m.heads} heads "
           f"({m.kv_groups} kv groups), ffn {m.ffn}, vocab {m.vocab}, {m.max_positions} positions; "
           f"{m.hf_num_params() / 1e9:.2f} B parameters",
           f"layout: {p.nodes} node{'s' * (p.nodes != 1)} x {p.gpus_per_node} GPUs = {p.world} ranks = "
           f"tp {p.tp} x pp {p.pp} x dp {p.dp}; "
           + part.get(p.zero_stage, f"ZeRO-{p.zero_stage}: frozen weights replicated over dp {p.dp}") + f"; {dtype}",
           f"batch: global {p.global_batch} = micro {p.micro_batch} x {p.micro_batches} micro-batches per step x "
           f"dp {p.dp}; seq_len {p.seq_len}; {p.n_prompt} prompt tokens x {p.prompt_groups} group(s), {p.encoder} "
           f"encoder; activation "
           f"checkpointing {ck}", "",
           f"memory per rank (GiB; every rank of a line holds the same; 'total' = the step's peak with "
           f"checkpointing {ck}):"]
    head = ["stage", "ranks", "frozen" + (" (host)" if p.offload else ""), "encoder+AdamW", "act no-ckpt",
            "act ckpt", "gathers", "total", "load peak (host)"]
    rows = [[r.stages, str(r.ranks), _gib(r.frozen), _gib(r.encoder), _gib(r.act), _gib(r.act_ckpt), _gib(r.gather),
             _gib(r.total), _gib(r.load)] for r in p.stages]
    out += _table(head, rows)
    out += ["", "communication per optimizer step per rank (GiB sent; as much received):"]
    head = ["stage", "ZeRO-3 all-gather", "TP all-reduce", "PP send", "DP all-reduce", "total"]
    rows = [[r.stages] + [_comm(x) for x in (r.comm.zero3_gather, r.comm.tp_allreduce, r.comm.pp_send,
                                               r.comm.dp_allreduce, r.comm.total)] for r in p.stages]
    out += _table(head, rows)
    load = max(r.load for r in p.stages)
    out += ["", f"set-up: each rank reads only its shard (held + the largest slice in flight): up to {_gib(load, 1)} GiB of "
            f"host memory per rank, {_gib(load * p.gpus_per_node, 1)} GiB per node of {p.gpus_per_node} GPUs",
            f"runtime reserve (CUDA context, NCCL, allocator; not modelled): {_gib(p.reserve_bytes, 1)} GiB", "",
            *timing(step_time(p, rates), rates), "", f"VERDICT: {p.verdict}"]
    return out


def _rates(r: Rates) -> str:
    return (f"{r.flops / 1e12:g} TFLOP/s a GPU, {r.intra / GB:g} GB/s within a node, {r.inter / GB:g} GB/s across "
            f"nodes, {r.latency * 1e6:g} us a collective, {r.overlap:g} of gathers and sends overlapped, "
            f"{r.copy / GB:g} GB/s copies, {r.zero3_call * 1e6:g} us a ZeRO-3 fetch")


def timing(t: StepTime, r: Rates) -> list[str]:
    """The time model's lines (``planning/timing.py``): the total and its terms."""
    return [f"step time (predicted from {_rates(r)}; {t.links}):",
            f"{t.total:.3g} s per optimizer step, {t.tokens_per_s:,.0f} tokens/s = compute {t.compute:.3g} + TP "
            f"all-reduce {t.tp:.3g} + ZeRO-3 gather {t.zero3:.3g} + PP send {t.pp:.3g} + DP all-reduce {t.dp:.3g} "
            f"+ pipeline bubble {t.bubble:.3g} s (critical stage {t.stage}); bound by {t.bottleneck}"]


def search_report(found, args: PlanArgs, name: str, shape: ModelShape, kw: dict, rates: Rates) -> list[str]:
    """--search: the fastest layouts that fit, a table, then BEST (or NONE FITS) as the last line."""
    out = [f"model: {name}: {shape.family}-style, {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads; "
           f"{shape.hf_num_params() / 1e9:.2f} B parameters",
           f"cluster: {args.nodes} node{'s' * (args.nodes != 1)} x {args.gpus_per_node} GPUs = "
           f"{args.nodes * args.gpus_per_node} ranks of "
           f"{args.gpu_mem_gb:g} GiB ({args.reserve_gb:g} reserved); ZeRO-{kw['zero_stage']}; {kw['dtype_bytes']}-byte "
           f"backbone; micro batch {kw['micro_batch']}",
           f"rates: {_rates(rates)}",
           f"search: {found.tried} tp x pp x checkpointing layouts, {found.divide} divide, {len(found.fitting)} fit; "
           f"the fastest {min(args.top, len(found.fitting))} (step time predicted by planning/timing.py):", ""]
    head = ["#", "tp x pp x dp", "ckpt", "gather", "global", "micro-batches", "step (s)", "tokens/s", "peak GiB (stage)",
            "compute", "TP", "ZeRO-3", "PP", "bubble", "bound by", "links"]
    rows = [[str(i + 1), f"{p.tp} x {p.pp} x {p.dp}", "on" if p.checkpointing else "off",
             p.zero3_gather if p.zero_stage == 3 and p.dp > 1 else "-", str(p.global_batch),
             str(p.micro_batches), f"{t.total:.3g}", f"{t.tokens_per_s:,.0f}", f"{_gib(p.worst.total, 1)} ({p.worst.stages})",
             *(f"{x:.3g}" for x in (t.compute, t.tp, t.zero3, t.pp, t.bubble)), t.bottleneck, t.links]
            for i, (p, t) in enumerate(found.fitting[: args.top])]
    out += _table(head, rows) if rows else ["(none)"]
    if found.fitting:
        p, t = found.fitting[0]
        return out + ["", f"BEST: --tp {p.tp} --pp {p.pp}" + " --activation_checkpointing" * p.checkpointing
                      + (f" --zero3_gather {p.zero3_gather}" if p.zero_stage == 3 and p.dp > 1 else "")
                      + f" (dp {p.dp}): {t.total:.3g} s per step, {t.tokens_per_s:,.0f} tokens/s, bound by "
                      f"{t.bottleneck}; {_gib(p.worst.total, 1)} GiB on the fullest rank"]
    c = found.closest
    return out + ["", f"NONE FITS: the leanest layout, --tp {c.tp} --pp {c.pp}" + " --activation_checkpointing"
                  * c.checkpointing + f", needs {_gib(c.worst.total, 1)} GiB + {args.reserve_gb:g} reserved "
                  f"of {args.gpu_mem_gb:g} GiB"]


def rates_of(args: PlanArgs) -> Rates:
    """The time model's rates from the flags; ConfigError naming the flag for a bad value."""
    import math

    for flag, zero in (("gpu_tflops", 0), ("intra_node_gbps", 0), ("inter_node_gbps", 0), ("gpu_copy_gbps", 0),
                       ("collective_latency_us", 1), ("zero3_fetch_us", 1)):
        v = getattr(args, flag)
        if not (math.isfinite(v) and (v >= 0 if zero else v > 0)):
            raise ConfigError(f"--{flag} must be a finite number {'>=' if zero else '>'} 0, got {v!r}")
    if not 0 <= args.comm_overlap <= 1:
        raise ConfigError(f"--comm_overlap must be in [0, 1], got {args.comm_overlap!r}")
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top!r}")
    return Rates(args.gpu_tflops * 1e12, args.intra_node_gbps * GB, args.inter_node_gbps * GB,
                 args.collective_latency_us * 1e-6, args.comm_overlap, args.gpu_copy_gbps * GB,
                 args.zero3_fetch_us * 1e-6)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    w = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.rjust(n) for c, n in zip(cells, w))  # noqa: E731
    return [line(head), line(["-" * n for n in w])] + [line(r) for r in rows]


def main(argv=None) -> int:
    ap = Parser(prog="ptuning-plan", description="A TP x PP x DP layout's per-rank memory, "
                                 "communication and predicted time per step and verdict, without any GPU; --search: "
                                 "the fastest layouts that fit. Exit 0: fits, 1: does not fit, 2: does not divide "
                                 "or bad input.")
    own = cli_args.add_fields(ap, PlanArgs)
    ns = ap.parse_args(argv)
    try:
        args = cli_args.build(PlanArgs, ns, own)
        rates = rates_of(args)
        name, shape = model_shape(args.model)
        kw = settings(args)
        accum = kw.pop("accumulation")
        if args.gpu_mem_gb <= 0 or args.reserve_gb < 0 or args.reserve_gb >= args.gpu_mem_gb:
            raise ConfigError("--gpu_mem_gb must be > 0 and --reserve_gb in [0, --gpu_mem_gb)")
        common = dict(seq_len=args.seq_len, n_prompt=args.n_prompt, prompt_groups=args.prompt_groups,
                      encoder=args.encoder, gpu_mem_bytes=int(args.gpu_mem_gb * GiB),
                      reserve_bytes=int(args.reserve_gb * GiB), name=name, zero3_gather=args.zero3_gather, **kw)
        if args.search:
            given = lambda flag: getattr(ns, flag) is not None  # noqa: E731 - a flag on the command line
            found = search(shape, args.nodes, args.gpus_per_node, rates, tps=[args.tp] if given("tp") else None,
                           pps=[args.pp] if given("pp") else None, accumulation=accum,
                           checkpointing=[args.activation_checkpointing] if given("activation_checkpointing")
                           else (False, True), **common)
            print("\n".join(search_report(found, args, name, shape, kw, rates)))
            return 0 if found.fitting else 1
        world, cut = args.nodes * args.gpus_per_node, args.tp * args.pp
        if kw["global_batch"] is None and accum is not None and cut > 0 and world % cut == 0:
            common["global_batch"] = kw["micro_batch"] * accum * (world // cut)  # the JSON's accumulation steps
        p = plan(shape, args.nodes, args.gpus_per_node, args.tp, args.pp, checkpointing=args.activation_checkpointing,
                 **common)
        if accum is not None and accum != p.micro_batches:
            raise ConfigError(f"--ds_config {args.ds_config}: gradient_accumulation_steps = {accum} contradicts global "
                              f"{p.global_batch} / (micro {p.micro_batch} x dp {p.dp}) = {p.micro_batches}")
    except PTuningError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report(p, rates)))
    return 0 if p.fits else 1
