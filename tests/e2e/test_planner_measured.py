"""The planner's per-rank memory predictions against measured runs of small models on this machine
(benchmarks/layout_memory.py's layouts, real gloo ranks)."""
from __future__ import annotations

import sys

from distutil import ROOT

from ptuning_dist.planning.planner import plan
from ptuning_dist.planning.shape import ModelShape


def test_planner_matches_measured_runs(tmp_path):
    """The planner's per-rank step and set-up peaks against real runs of benchmarks/layout_memory.py's
    ZeRO-3 (under TP) and TP x PP layouts on a GPT-2-small-shaped backbone (12 x 768, fp32): within
    10% on every rank, with the runtime measured as that benchmark's 'runtime B' (the same layout
    run with the 2 x 64 model, less what the planner predicts for it). The model's terms are 15-40% of
    the step peak here and ~55% of the set-up peak, so 10% of the peak allows them more (the printed
    table shows them alone: measured peak less the runtime, against the model). Frozen bytes: exact."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import layout_memory as bench

    tiny, model = bench.build_backbone(tmp_path, tiny=True), bench.build_backbone(tmp_path, tiny=False)
    # ZeRO-3 under TP, and TP x PP: two of the benchmark's layouts (each is 2 four-rank runs, ~1 min
    # apiece on 2 cores; benchmarks/RESULTS.md compares all eight, ZeRO-3 under PP included)
    layouts = [lay for lay in bench.LAYOUTS if lay[0] in ("tp2 pp1 dp2, zero3", "tp2 pp2 dp1")]
    assert len(layouts) == 2
    failures, table = [], []
    for name, world, flags in layouts:
        tp, pp, dp, partitioning = bench._layout(world, flags)
        plans = {}
        for which in (model, tiny):
            recs = bench.run_layout(which, tmp_path, name, world, flags, steps=2)
            plans[which] = recs, plan(
                ModelShape.from_hf_config(which), 1, world, tp, pp, zero_stage=3 if partitioning == "zero3" else 0,
                dtype_bytes=recs[0]["dtype_bytes"], micro_batch=bench.MICRO,
                global_batch=bench.MICRO * bench.ACCUM * dp,
                seq_len=max(r["seq_len"] for r in recs), n_prompt=recs[0]["n_prompt"], encoder="lstm",
                prompt_groups=recs[0]["prompt_groups"])
        (recs, p), (t_recs, t_p) = plans[model], plans[tiny]
        row = lambda pl, stage: next(r for r in pl.stages if r.first <= stage <= r.last)  # noqa: E731
        for rank, (rec, t_rec) in enumerate(zip(recs, t_recs)):
            stage = rec["coords"][0]
            r, t = row(p, stage), row(t_p, stage)
            assert rec["frozen_bytes_held"] == r.frozen, (name, rank)
            for what, peak, runtime, pred in (("step", "step_peak", t_rec["step_peak"] - t.total, r.total),
                                              ("set-up", "setup_peak", t_rec["setup_peak"] - t.load, r.load)):
                ratio = rec[peak] / (runtime + pred)
                table.append(f"{name} rank {rank} {what}: measured {rec[peak] / 2**20:.0f} MiB, predicted "
                             f"{(runtime + pred) / 2**20:.0f} MiB, ratio {ratio:.3f}; model terms: measured "
                             f"{(rec[peak] - runtime) / 2**20:.0f}, predicted {pred / 2**20:.0f} MiB")
                if abs(ratio - 1) > 0.10:
                    failures.append(table[-1])
    print("\n".join(table))
    assert not failures, "\n".join(failures)
