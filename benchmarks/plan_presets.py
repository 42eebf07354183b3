"""The dry-run planner's predictions for the preset models at layouts that divide (no GPU involved).

    .venv/bin/python benchmarks/plan_presets.py     # prints the table and writes its sections of RESULTS.md

Two sections: the plans of chosen layouts (below), and the layouts ``launchers/plan.py --search``
recommends for the 20B, 175B and 530B presets on 8 x 80 GB nodes (``SEARCHES``: the search's own
output, with its predicted step times; the time model is checked against measured runs on this
machine by benchmarks/plan_time_check.py).

Each row is ``ptuning_dist.parallel.planner.plan`` for one layout: bf16 backbone, micro batch 1,
sequence length 2048 (GPT-2 XL: its 1024 positions), 6 prompt tokens, 80 GiB GPUs with 2 GiB kept
for the runtime (launchers/plan.py's default). The memory model behind it is checked against
measured runs of small models on this machine (tests/e2e/test_planner_measured.py).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import write_section  # noqa: E402 - benchmarks/common.py

from ptuning_dist.planning.planner import PRESETS, GiB, plan  # noqa: E402

BEGIN, END = "<!-- plan_presets:begin -->", "<!-- plan_presets:end -->"
# (preset, nodes, tp, pp, global batch, ZeRO stage, encoder); 8 GPUs a node
LAYOUTS = [
    ("gpt2-xl", 1, 1, 1, 512, 3, "lstm"),
    ("gpt-20b", 4, 8, 2, 512, 3, "lstm"),
    ("gpt-175b", 16, 8, 8, 1536, 3, "lstm"),  # GPT-3's batch of 1536 sequences
    ("gpt-175b", 16, 8, 8, 1536, 0, "lstm"),
    ("gpt-530b", 280, 8, 35, 1920, 3, "lstm"),  # MT-NLG's layout (280 DGX nodes, tp 8, pp 35) and batch
    ("gpt-530b", 280, 8, 35, 1920, 3, "mlp"),
    ("gpt-530b", 280, 8, 35, 1920, 0, "mlp"),
]
GPUS, MICRO, SEQ, GPU_MEM, RESERVE = 8, 1, 2048, 80 * GiB, 2 * GiB
SEARCH_BEGIN, SEARCH_END = "<!-- plan_search:begin -->", "<!-- plan_search:end -->"
# (preset, nodes, global batch, encoder, ZeRO stages searched), the planner's default rates; 530B with the
# paper's LSTM encoder fits nowhere (the encoder alone outgrows a GPU), so with the MLP encoder
SEARCHES = [("gpt-20b", 4, 512, "lstm", (0, 3)), ("gpt-175b", 16, 1536, "lstm", (0, 3)),
            ("gpt-530b", 280, 1920, "mlp", (0, 3)), ("gpt-530b", 280, 1920, "lstm", (3,))]


def verdict(p) -> str:
    return "fits" if p.fits else f"**no** (+{(p.worst.total + p.reserve_bytes - p.gpu_mem_bytes) / GiB:.0f} GiB)"


def command(name, nodes, tp, pp, glob, zero, enc, seq) -> str:
    return (f"launchers/plan.py --model {name} --nodes {nodes} --gpus-per-node {GPUS} --tp {tp} --pp {pp} "
            f"--zero_stage {zero} --dtype bfloat16 --micro_batch_size {MICRO} --global_batch_size {glob} "
            f"--seq_len {seq} --encoder {enc} [--activation_checkpointing]")


def main() -> None:
    t0 = time.perf_counter()
    head = ("| model (params) | layout: nodes x 8, tp x pp x dp | ZeRO | encoder | micro-batches per step "
            "| frozen / rank (GiB) | encoder + AdamW (GiB) | peak / rank, no ckpt (GiB) | peak / rank, ckpt (GiB) "
            "| verdict at 80 GiB: no ckpt / ckpt | ZeRO-3 all-gather (GiB/step) | TP all-reduce, no ckpt / ckpt "
            "(GiB/step) | PP send (GiB/step) | DP all-reduce (MiB/step) | importer host peak / node (GiB) |")
    rows, cmds = [head, "|" + "---|" * (head.count("|") - 1)], []
    for name, nodes, tp, pp, glob, zero, enc in LAYOUTS:
        shape = PRESETS[name]
        seq = min(SEQ, shape.max_positions)
        kw = dict(zero_stage=zero, dtype_bytes=2, micro_batch=MICRO, global_batch=glob, seq_len=seq, encoder=enc,
                  gpu_mem_bytes=GPU_MEM, reserve_bytes=RESERVE, name=name)
        off, on = plan(shape, nodes, GPUS, tp, pp, **kw), plan(shape, nodes, GPUS, tp, pp, checkpointing=True, **kw)
        w_off, w_on = off.worst, on.worst
        c_off = max(off.stages, key=lambda r: r.comm.total).comm
        c_on = max(on.stages, key=lambda r: r.comm.total).comm
        rows.append(
            f"| {name} ({shape.hf_num_params() / 1e9:.1f} B) | {nodes} x 8, {tp} x {pp} x {off.dp} | {zero} | {enc} "
            f"| {off.micro_batches} | {max(r.frozen for r in off.stages) / GiB:.2f} | {w_off.encoder / GiB:.1f} "
            f"| {w_off.total / GiB:.1f} (stage {w_off.stages}) | {w_on.total / GiB:.1f} (stage {w_on.stages}) "
            f"| {verdict(off)} / {verdict(on)} | {c_on.zero3_gather / GiB:.0f} "
            f"| {c_off.tp_allreduce / GiB:.0f} / {c_on.tp_allreduce / GiB:.0f} | {c_on.pp_send / GiB:.0f} "
            f"| {c_on.dp_allreduce / 2**20:.2f} | {max(r.load for r in off.stages) * GPUS / GiB:.0f} |")
        cmds.append(command(name, nodes, tp, pp, glob, zero, enc, seq))
    seconds = time.perf_counter() - t0
    notes = _notes()
    print("\n".join(rows + [""] + cmds + [""] + notes + [f"({seconds:.2f} s for {2 * len(LAYOUTS)} plans)"]))
    body = ["## Dry-run plans of the preset models (predictions, not measurements)", "",
            "Command: `.venv/bin/python benchmarks/plan_presets.py` (each row is also "
            "`.venv/bin/python launchers/plan.py ...` with the flags listed below the table).", "",
            f"Every number is the planner's prediction (`ptuning_dist/planning/planner.py` over the memory model "
            f"`ptuning_dist/planning/memory.py`), not a measurement: no GPU was used. What is validated: "
            f"`tests/e2e/test_planner_measured.py` runs three small layouts on this CPU "
            f"machine (a 12 x 768 GPT-2, fp32; tp2 x dp2 ZeRO-3, pp2 x dp2 ZeRO-3, tp2 x pp2) and finds every "
            f"rank's step and set-up peak within 10% of the planner's (0.95-1.07 when written), the runtime "
            f"measured on a 2 x 64 model as in `benchmarks/layout_memory.py`; there the model's own terms are "
            f"15-40% of the step peak. Not validated: the extrapolation to GPUs, bf16, sequence length 2048 and "
            f"these sizes (the activation estimate is the least certain term), and the communication volumes, "
            f"which are counted from the code's collectives, not measured. "
            f"bf16 backbone, micro batch {MICRO}, sequence length {SEQ} (GPT-2 XL: its 1024 positions), 6 prompt "
            f"tokens, 80 GiB GPUs with 2 GiB kept for the runtime. Peak = frozen + encoder and AdamW + activations + "
            f"ZeRO-3 gather buffers on the fullest stage; communication is per rank per optimizer step on the "
            f"busiest stage, ZeRO-3/PP/DP with activation checkpointing (they do not depend on it).", "",
            *rows, "", "Commands (`.venv/bin/python` + ...; without `--activation_checkpointing` for the no-ckpt "
            "columns):", "", *[f"- `{c}`" for c in cmds], "", "Reading:", "", *notes]
    write_section(BEGIN, END, body)
    write_section(SEARCH_BEGIN, SEARCH_END, search_section())


def search_section() -> list[str]:
    """``launchers/plan.py --search`` for each of ``SEARCHES``, its output verbatim."""
    import contextlib
    import io

    from ptuning_dist.cli.plan import main as plan_main

    body = ["## Recommended layouts for the presets on 8x80 GB nodes (planner search, issue 17)", "",
            "Command: `.venv/bin/python benchmarks/plan_presets.py` (this section: the `launchers/plan.py --search` "
            "commands below, their output verbatim). Predictions, not measurements: no GPU was used. Each search "
            "tries every TP dividing the node's 8 GPUs x every PP dividing the layers x activation checkpointing "
            "off/on, keeps the layouts that divide and fit 80 GiB (2 GiB kept for the runtime) and ranks them by "
            "predicted tokens/s under the planner's default rates (an A100-80GB node: 160 TFLOP/s a GPU on a whole "
            "layer, 200 GB/s NVLink, 25 GB/s a GPU across nodes, 20 us a collective, nothing overlapped; see "
            "`ptuning_dist/planning/timing.py`). bf16, micro batch 1, sequence length 2048.", ""]
    best = []
    for name, nodes, glob, enc, zeros in SEARCHES:
        for zero in zeros:
            argv = ["--model", name, "--nodes", str(nodes), "--gpus-per-node", str(GPUS), "--search", "--zero_stage",
                    str(zero), "--dtype", "bfloat16", "--micro_batch_size", str(MICRO), "--global_batch_size",
                    str(glob), "--seq_len", str(SEQ), "--encoder", enc, "--top", "5"]
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = plan_main(argv)
            lines = out.getvalue().rstrip("\n").splitlines()
            print("\n".join(lines) + "\n")
            best.append(f"- {name} on {nodes} x 8, ZeRO-{zero}, {enc} encoder: {lines[-1]}")
            body += [f"`.venv/bin/python launchers/plan.py {' '.join(argv)}` (exit {code})", "", "```",
                     *lines, "```", ""]
    return body + ["Summary (each search's last line):", "", *best]


def _notes() -> list[str]:
    """The reading, computed from the model (so it stays true if the presets or the model change)."""
    from ptuning_dist.prompt.encoder import num_params

    big = PRESETS["gpt-530b"]
    n_lstm = num_params("lstm", 6, big.hidden)
    n_mlp = num_params("mlp", 6, big.hidden)
    kw = dict(zero_stage=3, dtype_bytes=2, micro_batch=MICRO, global_batch=1920, seq_len=SEQ, encoder="mlp",
              checkpointing=True)
    z3, z0 = plan(big, 280, GPUS, 8, 35, **kw), plan(big, 280, GPUS, 8, 35, **{**kw, "zero_stage": 0})
    kw = dict(zero_stage=3, dtype_bytes=2, micro_batch=MICRO, global_batch=1536, seq_len=SEQ)
    g_off, g_on = (plan(PRESETS["gpt-175b"], 16, GPUS, 8, 8, checkpointing=c, **kw) for c in (False, True))
    return [
        f"- The P-tuning LSTM encoder grows as h^2 and is replicated in fp32 with AdamW (20 bytes a parameter at "
        f"the update): at h = {big.hidden} it has {n_lstm / 1e9:.1f} B parameters, "
        f"{20 * n_lstm / GiB:.0f} GiB on every stage-0 rank, more than an 80 GiB GPU whatever the layout. The MLP "
        f"encoder ({n_mlp / 1e9:.2f} B, {20 * n_mlp / GiB:.0f} GiB) fits; so would sharding the encoder (not "
        f"implemented).",
        f"- ZeRO-3 on a frozen backbone trades memory for traffic that grows with the micro-batches: each layer is "
        f"gathered twice per micro-batch. For 530B at tp 8 x pp 35 x dp 8 it holds "
        f"{max(r.frozen for r in z3.stages) / GiB:.2f} GiB of frozen weights per rank instead of "
        f"{max(r.frozen for r in z0.stages) / GiB:.2f} GiB (ZeRO-0), but its gather buffers (three layers and the "
        f"embeddings) take {z3.worst.gather / GiB:.2f} GiB, so the peak is {z3.worst.total / GiB:.1f} GiB against "
        f"ZeRO-0's {z0.worst.total / GiB:.1f} GiB, for {max(r.comm.zero3_gather for r in z3.stages) / GiB:.0f} GiB "
        f"of all-gather per rank per step ({z3.micro_batches} micro-batches). With no gradients or optimizer state "
        f"to partition, ZeRO-0 is the better choice whenever the replicated stage fits; ZeRO-3 pays off when a "
        f"stage holds many layers (small pp).",
        f"- Activation checkpointing lowers 175B's stage-0 peak (1F1B keeps min(pp, micro-batches) micro-batches "
        f"in flight there) from {g_off.worst.total / GiB:.1f} to {g_on.worst.total / GiB:.1f} GiB and costs 1.5x "
        f"the TP all-reduce traffic (the recompute's forward).",
        f"- Set-up (last column, a node of 8): the shard-wise loader holds what the rank will hold plus the "
        f"largest tensor's slice twice (read, then regrouped), in the run's dtype. For 175B at tp 8 x pp 8 that "
        f"is {max(r.load for r in g_off.stages) * GPUS / GiB:.0f} GiB per node (the whole model in fp32 on every "
        f"rank, as the importer read it before, was {8 * 4 * PRESETS['gpt-175b'].hf_num_params() / GiB:.0f} GiB); "
        f"for 530B at tp 8 x pp 35, {max(r.load for r in z0.stages) * GPUS / GiB:.0f} GiB. Measured at 2B "
        "parameters: `benchmarks/load_scale.py`.",
    ]


if __name__ == "__main__":
    main()
