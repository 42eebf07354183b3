"""One table of the layouts (issue 17): the same P-tuning job on each parallel layout, measured, with the
planner's prediction beside each number.

    TORCH_EXTENSIONS_DIR=/tmp/ext .venv/bin/python benchmarks/layouts.py           # writes its RESULTS.md section
    TORCH_EXTENSIONS_DIR=/tmp/ext .venv/bin/python benchmarks/layouts.py --quick   # 2 x 64 model, 2 layouts

Why: a user choosing a layout wants its speed and its memory per rank side by side, and whether the
planner (``ptuning-plan``) would have told them so without the machines. The job, the worker and the
rates are ``plan_time_check.py``'s (a GPT-2-small-shaped backbone, 12 x 768, fp32, random weights, on
FewGLUE RTE rows cut to 64 tokens, micro batch 4, 4 micro-batches per step per DP rank, packing off),
except that the ZeRO-3 runs keep the run's default ``--zero3_gather auto`` and every run the default
``--host_malloc`` (what a user gets). Per layout:

- tokens/s: the global batch's tokens (rows x mean length) over the median timed step, every step
  between barriers; predicted: ``planning.timing.step_time`` for the same layout, at the rates its
  ranks sampled between the steps (``plan_time_check.sample_rates``);
- memory per rank: each rank's peak RSS during a timed step (``VmHWM``, reset when the step starts),
  the fullest rank's, and that less its RSS after importing torch, DeepSpeed, transformers and
  megatron-core (the runtime); predicted: the planner's step peak of the fullest stage (frozen weights held,
  gathered, activations, the encoder and AdamW), which has no runtime term.

FSDP2 is planned as ZeRO-3 gathering per layer (it re-shards after each block's forward and gathers
again for its backward); its per-gather framework cost is not sampled (DeepSpeed's is), so it is 0.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import plan_time_check as ptc  # noqa: E402
from common import build_backbone, machine, parse_args, write_section  # noqa: E402

BEGIN, END = "<!-- layouts:begin -->", "<!-- layouts:end -->"
Z3 = ["--ds_config", str(ROOT / "ds_configs" / "zero3.json")]
LAYOUTS = [  # (name, ranks, flags)
    ("megatron, 1 rank", 1, ["--backend", "megatron"]),
    ("megatron, TP=2", 2, ["--backend", "megatron", "--tp", "2"]),
    ("megatron, PP=2 (1F1B)", 2, ["--backend", "megatron", "--pp", "2"]),
    ("megatron, TP=2 x DP=2, ZeRO-3", 4, ["--backend", "megatron", "--tp", "2", *Z3]),
    ("megatron, TP=2 x DP=2, FSDP2", 4, ["--backend", "megatron", "--tp", "2", "--fsdp2", "true"]),
    ("hf, DP=2, ZeRO-3", 2, ["--backend", "hf", *Z3]),
    ("hf, DP=2, FSDP2", 2, ["--backend", "hf", "--fsdp2", "true"]),
]
LAYOUTS_FLAGS = {name: flags for name, _, flags in LAYOUTS}
MiB = 1 << 20


def main() -> None:
    args = parse_args(__doc__, 3, "tiny model, two layouts")
    if args.worker:
        return ptc.worker(args)
    t_start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_backbone(tmp, tiny=args.quick)
        for name, world, flags in [LAYOUTS[1], LAYOUTS[5]] if args.quick else LAYOUTS:
            t0 = time.perf_counter()
            recs = ptc.run_layout(model, tmp, name, world, flags, args.steps, host_malloc="auto", worker=__file__)
            measured = statistics.median(recs[0]["steps"][ptc.WARMUP:])
            p, rates, t = ptc.predict(model, world, flags, recs)
            rows.append((name, world, p, t, measured, recs))
            print(f"{name}: {t.tokens / measured:.0f} tokens/s measured, {t.tokens_per_s:.0f} predicted; "
                  f"peak {max(_peak(r) for r in recs) / MiB:.0f} MiB a rank; {time.perf_counter() - t0:.0f} s", flush=True)
    table = _table(rows)
    print("\n".join(table))
    if not args.quick:
        _write(table, rows, args.steps, time.perf_counter() - t_start)


def _peak(rec: dict) -> int:
    return max(rec["step_peak"][ptc.WARMUP:])


def _table(rows) -> list[str]:
    head = ("| layout | ranks | gather | tokens/s | predicted | predicted / measured | peak RSS per rank (MiB) "
            "| above the imports (MiB) | predicted (MiB) | frozen held per rank (MiB) | load |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    base = next((t.tokens / m for name, _, _, t, m, _ in rows if name == "megatron, 1 rank"), None)
    for name, world, p, t, measured, recs in rows:
        full = max(recs, key=_peak)  # the fullest rank
        tok = t.tokens / measured
        gather = recs[0].get("gather", "-") if p.zero_stage == 3 and p.dp > 1 else "-"
        gather = "layer (FSDP2)" if "--fsdp2" in LAYOUTS_FLAGS.get(name, []) else gather
        speed = f"{tok:.0f}" + (f" ({tok / base:.2f}x)" if base and name != "megatron, 1 rank" else "")
        out.append(f"| {name} | {world} | {gather} | {speed} | {t.tokens_per_s:.0f} | {t.total / measured:.2f} "
                   f"| {_peak(full) / MiB:.0f} | {(_peak(full) - full['baseline_rss']) / MiB:.0f} "
                   f"| {p.worst.total / MiB:.0f} | {max(r['frozen_held'] for r in recs) / MiB:.0f} "
                   f"| {recs[0]['load'][0]:.1f}-{recs[0]['load'][1]:.1f} |")
    return out



def _reading(rows) -> list[str]:
    """What the table says, from its numbers."""
    base = next(t.tokens / m for name, _, _, t, m, _ in rows if name == "megatron, 1 rank")
    speed = ", ".join(f"{name.split(', ', 1)[1]} {t.tokens / m / base:.2f}x" for name, world, _, t, m, _ in rows
                      if world == 2 and name.startswith("megatron")) + ", " + ", ".join(
        f"hf {name.split(', ', 1)[1]} {t.tokens / m / base:.2f}x" for name, world, _, t, m, _ in rows
        if name.startswith("hf"))
    held = " -> ".join(sorted({f"{max(r['frozen_held'] for r in recs) / MiB:.0f}" for *_, recs in rows},
                              key=float, reverse=True))
    over = [(_peak(max(recs, key=_peak)) - max(recs, key=_peak)["baseline_rss"]) / p.worst.total
            for _, _, p, _, _, recs in rows]
    off = "; ".join(f"{name} {t.total / m:.2f}" for name, _, _, t, m, _ in rows if abs(t.total / m - 1) > 0.25)
    return ["Reading:", "",
            f"- Speed: one rank computes on one of the 2 cores (one thread a rank), the 2-rank layouts on both: "
            f"over the 1-rank run, {speed}. ZeRO-3 gathers each weight once a step here (`auto` -> step), "
            f"FSDP2 every layer for each forward and backward. The 4-rank layouts put 2 ranks on a core, so "
            f"they show what TP x DP costs in communication, not what it gains.",
            f"- Memory: the frozen weights a rank holds halve with each factor of TP, PP or DP ({held} MiB); "
            f"the rest of a rank's peak is runtime and activations. Above the imports the peak is "
            f"{min(over):.1f}-{max(over):.1f}x the planner's step peak: the planner models a GPU's tensors, "
            f"not a CPU process's process group, DeepSpeed engine, JIT extension and glibc heap "
            f"(`benchmarks/layout_memory.py` fits that runtime per layout and checks the model within 10%).",
            f"- Predicted step times off by more than 25% (predicted / measured): {off or 'none'}; the 4-rank "
            f"runs' ranks share cores, and a rank another job delays stalls the others at every collective."]


def _write(table, rows, steps, seconds) -> None:
    loads = [x for *_, recs in rows for x in recs[0]["load"]]
    within = sum(abs(t.total / m - 1) <= 0.25 for _, _, _, t, m, _ in rows)
    body = ["## The layouts side by side (issue 17)", "",
            f"Command: `TORCH_EXTENSIONS_DIR=/tmp/ext .venv/bin/python benchmarks/layouts.py` ({seconds / 60:.1f} "
            f"min). Machine: {machine()}; gloo, `OMP_NUM_THREADS=1` per rank (the 4-rank layouts: 2 ranks a core); "
            f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs (column 'load').", "",
            f"The job of the step-time check (section 'Step-time model vs measured runs': GPT-2-small shape, fp32, FewGLUE RTE at 64 tokens, micro batch "
            f"{ptc.MICRO}, {ptc.ACCUM} micro-batches per step per DP rank, packing off) with the run's defaults for "
            f"`--zero3_gather` (auto) and `--host_malloc`; the median of {steps} steps after {ptc.WARMUP}. tokens/s: "
            f"global batch x mean length over the step (in brackets: over the 1-rank megatron run's); predicted: "
            f"the planner's step time at the rates the ranks sampled (`benchmarks/plan_time_check.py`). Memory: "
            f"the fullest rank's peak RSS during a step; 'above the imports': less its RSS after importing torch, "
            f"DeepSpeed, transformers and megatron-core (a process's runtime, which the planner's GPU model does "
            f"not count; what is left still holds the process group, DeepSpeed's engine and the C++ splice); "
            f"predicted: the planner's step peak of the fullest stage. {within} of {len(rows)} step times within 25%.",
            "", *table, "",
            *_reading(rows), ""]
    write_section(BEGIN, END, body)


if __name__ == "__main__":
    main()
