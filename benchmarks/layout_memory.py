"""TP x PP x DP layouts on the megatron backbone: per-rank memory measured against the memory model.

    .venv/bin/python benchmarks/layout_memory.py            # writes its section of benchmarks/RESULTS.md
    .venv/bin/python benchmarks/layout_memory.py --quick    # a tiny model, two layouts (smoke test)

Why: ``ptuning_dist/planning/memory.py`` predicts every rank's memory from the model's shape (and
will size 20B-530B layouts in the dry-run planner); this checks it on real runs. Each layout runs
the real training loop under ``torchrun`` with this file as the worker. Each rank records:

- the runtime baseline: its RSS after importing everything a run imports and starting the process
  group and megatron's groups, before any model is built (the same process, just earlier);
- the frozen bytes it holds (``partition_sizes``) and the peak RSS of set-up (``VmHWM``: the
  shard-wise import of its stage); then the peak is reset (``/proc/self/clear_refs`` 5) and
  read again after the last step's backward: the peak of the training steps.

The parent predicts each rank from ``layout_memory`` plus a runtime and tabulates measured /
predicted with the ratio, marking each within 10%. Two runtimes: A, that baseline; B, the same
layout run with a 2 x 64 model, its peaks less what the memory model predicts for it (A misses
what only running touches: the kernels' code pages, allocator and library state). Workers start
with glibc's mmap threshold pinned at 1 MiB (see ``ENV``), so freed tensors leave RSS.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import (build_backbone, machine, observed_recipe, parse_args, proc_status,  # noqa: E402
                    reset_peak, write_section)
BEGIN, END = "<!-- layout_memory:begin -->", "<!-- layout_memory:end -->"
MICRO, ACCUM = 8, 2  # micro-batches per step per DP rank: two, so a pipeline has something to overlap

# (name, ranks, flags): the layouts measured
LAYOUTS = [
    ("tp1 pp1 dp2, fsdp2", 2, ["--fsdp2", "true"]),
    ("tp2 pp1 dp1", 2, ["--tp", "2"]),
    ("tp2 pp1 dp2, fsdp2", 4, ["--tp", "2", "--fsdp2", "true"]),
    ("tp2 pp1 dp2, zero3", 4, ["--tp", "2", "--ds_config", str(ROOT / "ds_configs" / "zero3.json")]),
    ("tp1 pp2 dp1", 2, ["--pp", "2"]),
    ("tp2 pp2 dp1", 4, ["--tp", "2", "--pp", "2"]),
    ("tp1 pp2 dp2, zero3", 4, ["--pp", "2", "--ds_config", str(ROOT / "ds_configs" / "zero3.json")]),
    ("tp1 pp2 dp2, fsdp2", 4, ["--pp", "2", "--fsdp2", "true"]),
]
# One thread per rank (2 cores here). glibc's mmap threshold pinned at 1 MiB from process start: what
# --host_malloc mmap sets before the model loads, here also before the runtime baseline is read.
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def worker(args) -> None:
    import torch
    import torch.distributed  # noqa: F401 - everything a run imports, before the baseline is read
    import torch.distributed.fsdp  # noqa: F401
    import transformers  # noqa: F401
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel  # noqa: F401
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: F401

    from ptuning_dist.cli.common import quiet_libraries
    from ptuning_dist.cli.train import parse
    from ptuning_dist.parallel import launch
    from ptuning_dist.parallel.zero import partition_sizes

    quiet_libraries()
    cfg = parse(args.rest)
    D = launch.init(need_group=True, timeout_s=cfg.parallel.dist_timeout_s)  # train() reuses both
    launch.init_model_parallel(cfg.parallel.tp, cfg.parallel.pp)
    D.barrier()
    rec = {"baseline_rss": proc_status("VmRSS"), "seq_len": 0,
           "rss_parts": {"baseline": [proc_status("RssAnon"), proc_status("RssFile")]},
           "coords": [ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                      ps.get_data_parallel_rank()]}

    class Hooks:
        def after_setup(self, model, encoder, engine):
            size = model.frozen.backbone.dtype.itemsize
            rec["partitions"] = partition_sizes(model.frozen)
            rec["frozen_bytes_held"] = sum(local for _, _, local in rec["partitions"]) * size
            rec["dtype_bytes"] = size
            rec["n_prompt"] = None if encoder is None else encoder.groups.n_prompt[0]  # per group
            rec["prompt_groups"] = None if encoder is None else len(encoder.groups.names)
            rec["setup_peak"], rec["setup_rss"] = proc_status("VmHWM"), proc_status("VmRSS")
            rec["rss_parts"]["setup"] = [proc_status("RssAnon"), proc_status("RssFile")]

            def seq_len(_, a, kw):  # the training micro-batches' length as the backbone sees them
                ids_BS = a[0] if a and torch.is_tensor(a[0]) else kw.get("ids_BS")
                if torch.is_grad_enabled() and torch.is_tensor(ids_BS) and ids_BS.dim() == 2:
                    rec["seq_len"] = max(rec["seq_len"], ids_BS.shape[1])

            model.frozen.register_forward_pre_hook(seq_len, with_kwargs=True)
            reset_peak()

        def after_backward(self, step, encoder):
            rec["step_peak"] = proc_status("VmHWM")  # the last step's: after every earlier optimizer step
            rec["rss_parts"][f"step{step}"] = [proc_status("RssAnon"), proc_status("RssFile")]

    observed_recipe(Hooks())(cfg, log=lambda *a: None).run()
    Path(args.record, f"rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(rec))


def _layout(world: int, flags: list[str]) -> tuple[int, int, int, str]:
    opt = dict(zip(flags[::2], flags[1::2]))
    tp, pp = int(opt.get("--tp", 1)), int(opt.get("--pp", 1))
    partitioning = ("fsdp2" if opt.get("--fsdp2") == "true" else
                    "zero3" if opt.get("--ds_config", "").endswith("zero3.json") else "none")
    return tp, pp, world // (tp * pp), partitioning


def run_layout(model: Path, tmp: Path, name: str, world: int, flags: list[str], steps: int) -> list[dict]:
    """Per-rank records of one layout's run."""
    from ptuning_dist.parallel.launch import free_port

    dp = _layout(world, flags)[2]
    rec_dir = tmp / ("rec_" + model.name + "_" + name.replace(" ", "_").replace(",", ""))
    rec_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(free_port()), __file__, "--worker", "--record", str(rec_dir), "--model", str(model),
           "--backend", "megatron", *flags, "--output_dir", str(rec_dir / "out"), "--max_steps", str(steps),
           "--micro_batch_size", str(MICRO), "--global_batch_size", str(MICRO * ACCUM * dp),
           "--log_every", str(steps), "--host_malloc", "mmap",
           # the memory model's micro-batch is micro_batch_size rows of the longest row's length; packing
           # (on by default on megatron too) puts fewer, fuller rows in a forward: at most that, not equal
           "--packing", "off"]
    p = subprocess.run(cmd, env={**os.environ, **ENV}, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return [json.loads((rec_dir / f"rank{r}.json").read_text()) for r in range(world)]


def predict(model: Path, world: int, flags: list[str], recs: list[dict]) -> tuple[list, list[bool]]:
    """``layout_memory`` for this run, and per rank whether its recorded partitions equal
    ``predicted_partitions`` name by name (the rank coordinates are asserted)."""
    from ptuning_dist.planning.memory import layout_memory, predicted_partitions, rank_coords
    from ptuning_dist.planning.shape import ModelShape

    tp, pp, dp, partitioning = _layout(world, flags)
    shape = ModelShape.from_hf_config(model)
    seq_len = max(r["seq_len"] for r in recs)  # stages after the first see no token ids
    pred = layout_memory(shape, tp, pp, dp, dtype_bytes=recs[0]["dtype_bytes"], partitioning=partitioning,
                         n_prompt=recs[0]["n_prompt"], micro_batch=MICRO, seq_len=seq_len, micro_batches=ACCUM,
                         prompt_groups=recs[0]["prompt_groups"])
    exact = []
    for rank, (rec, p) in enumerate(zip(recs, pred)):
        assert tuple(rec["coords"]) == rank_coords(rank, tp, pp, dp) == (p.pp_stage, p.tp_rank, p.dp_rank)
        exact.append([tuple(x) for x in rec["partitions"]] == predicted_partitions(shape, tp, pp, dp, rank, partitioning))
    return pred, exact


def main() -> None:
    args = parse_args(__doc__, 4, "tiny model only, two layouts, 2 steps")
    if args.worker:
        return worker(args)

    steps = 2 if args.quick else args.steps
    step_rows, setup_rows, seconds, file_growth = [], [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = build_backbone(tmp, tiny=True)
        model = tiny if args.quick else build_backbone(tmp, tiny=False)
        for name, world, flags in LAYOUTS[:2] if args.quick else LAYOUTS:
            t0 = time.perf_counter()
            recs = run_layout(model, tmp, name, world, flags, steps)
            pred, exact = predict(model, world, flags, recs)
            # runtime B: the same layout with the 2 x 64 model, less what the memory model predicts for it
            t_recs = recs if args.quick else run_layout(tiny, tmp, name, world, flags, steps)
            t_pred = pred if args.quick else predict(tiny, world, flags, t_recs)[0]
            seconds[name] = time.perf_counter() - t0
            parts = {k: "/".join(_mib(x) for x in v) for k, v in recs[0]["rss_parts"].items()}
            print(f"{name}: {seconds[name]:.0f} s; rank 0 RssAnon/RssFile MiB: {parts}", flush=True)
            for rank, (rec, p, ok, t_rec, t_p) in enumerate(zip(recs, pred, exact, t_recs, t_pred)):
                base = rec["baseline_rss"]
                run_step, run_setup = t_rec["step_peak"] - t_p.step_bytes, t_rec["setup_peak"] - t_p.load_bytes
                step_rows.append((name, rank, rec["coords"], rec["frozen_bytes_held"], p.frozen_bytes, ok, base,
                                  rec["step_peak"], base + p.step_bytes, run_step, run_step + p.step_bytes))
                setup_rows.append((name, rank, rec["setup_peak"], base + p.load_bytes, run_setup + p.load_bytes))
                rss = rec["rss_parts"]
                file_growth.append(rss[f"step{steps}"][1] - rss["baseline"][1])
    tables = _tables(step_rows, setup_rows)
    notes = _notes(step_rows, setup_rows, file_growth)
    print("\n".join(tables[0] + [""] + tables[1] + [""] + notes))
    if not args.quick:
        _write_section(tables, notes, steps, seconds)


def _notes(step_rows, setup_rows, file_growth) -> list[str]:
    """The reading, computed from this run's numbers."""
    n = len(step_rows)

    def within(pairs):
        return sum(abs(m / p - 1) <= 0.10 for m, p in pairs)

    exact = sum(r[5] for r in step_rows)
    step_a = within((r[7], r[8]) for r in step_rows)
    step_b = within((r[7], r[10]) for r in step_rows)
    setup_a = within((r[2], r[3]) for r in setup_rows)
    setup_b = within((r[2], r[4]) for r in setup_rows)
    gap = sum(r[9] - r[6] for r in step_rows) / n
    checked = ["TP shards", "vocabulary padding"]
    checked += ["FSDP2's dim-0 chunks"] * any("fsdp2" in r[0] for r in step_rows)
    checked += ["ZeRO-3's ceil(numel/dp)"] * any("zero3" in r[0] for r in step_rows)
    checked += ["the stage cut and the tied head's copy on the last stage"] * any(r[2][0] for r in step_rows)
    return [
        f"- Frozen weights: on {exact} of {n} ranks the recorded `partition_sizes` equal `predicted_partitions` "
        "name by name and element by element (" + ", ".join(checked) + ").",
        f"- Step peak: within 10% on {step_b} of {n} ranks with runtime B, {step_a} of {n} with runtime A. B - A "
        f"= {_mib(gap)} MiB on average: what only running touches, e.g. file-backed pages (kernel code) grow by "
        f"{_mib(sum(file_growth) / len(file_growth))} MiB from the baseline to the last step. The model terms "
        "themselves are what B checks.",
        f"- Set-up peak: within 10% on {setup_b} of {n} ranks with runtime B ({setup_a} with A). The shard-wise "
        "import holds the stage it builds plus the slice in flight (`layout_memory(...).load_bytes`); "
        "`benchmarks/load_scale.py` checks it at 2B parameters, where the runtime no longer dominates.",
        "",
    ]


def _mib(x: float) -> str:
    return f"{x / 2**20:.0f}"


def _cmp(measured: float, predicted: float) -> str:
    ratio = measured / predicted
    return f"{_mib(predicted)} | {ratio:.2f} | {'yes' if abs(ratio - 1) <= 0.10 else '**no**'}"


def _tables(step_rows, setup_rows) -> tuple[list[str], list[str]]:
    step = ["| layout | rank | stage, tp, dp | frozen held (MiB): measured / predicted | names, sizes exact "
            "| baseline A (MiB) | step peak RSS (MiB) | predicted with A | ratio | within 10% "
            "| runtime B (MiB) | predicted with B | ratio | within 10% |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rank, coords, held, held_pred, exact, base, peak, pred_a, run, pred_b in step_rows:
        step.append(f"| {name} | {rank} | {', '.join(map(str, coords))} | {held / 2**20:.1f} / {held_pred / 2**20:.1f} "
                    f"| {'yes' if exact else '**no**'} | {_mib(base)} | {_mib(peak)} | {_cmp(peak, pred_a)} "
                    f"| {_mib(run)} | {_cmp(peak, pred_b)} |")
    setup = ["| layout | rank | set-up peak RSS (MiB) | predicted with A | ratio | within 10% "
             "| predicted with B | ratio | within 10% |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rank, peak, pred_a, pred_b in setup_rows:
        setup.append(f"| {name} | {rank} | {_mib(peak)} | {_cmp(peak, pred_a)} | {_cmp(peak, pred_b)} |")
    return step, setup


def _write_section(tables: tuple[list[str], list[str]], notes: list[str], steps: int, seconds: dict) -> None:
    body = ["## Per-rank memory of TP x PP x DP layouts against the memory model", "",
            "Command: `.venv/bin/python benchmarks/layout_memory.py`", "",
            f"Machine: {machine()}. GPT-2-small-shaped backbone (12 x 768, random "
            "weights, fp32, the bundled task's word-level vocabulary) on the megatron backend, P-tuning LSTM "
            f"encoder, micro batch {MICRO} x {ACCUM} micro-batches per step per DP rank, {steps} steps, "
            + ", ".join(f"`{k}={v}`" for k, v in ENV.items()) + ". Wall time per layout (both models): "
            + "; ".join(f"{k}: {v:.0f} s" for k, v in seconds.items()) + ".", "",
            "Predicted = a runtime + `ptuning_dist.planning.memory.layout_memory` for the rank. Step peak: frozen "
            "held + encoder and AdamW + activations + FSDP2/ZeRO-3 gathers, against `VmHWM` reset after set-up and read "
            "after the last backward. Set-up peak: the importer's load peak, against `VmHWM` at the end of set-up. "
            "Runtime A: the rank's own RSS after importing everything and starting its process groups, before "
            "any model is built. Runtime B: the same layout run with a 2 x 64 model, its peaks less "
            "what the memory model predicts for that model: A plus what only running touches (code pages "
            "of the kernels, allocator and library state).", "",
            "Frozen weights and the training-step peak:", "", *tables[0], "", "Set-up (import) peak:", "",
            *tables[1], "", "Reading (computed by the script from the tables above):", "", *notes]
    write_section(BEGIN, END, body)


if __name__ == "__main__":
    main()
