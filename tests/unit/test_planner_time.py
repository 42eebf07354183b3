"""The planner's step-time model and layout search (ptuning_dist/planning/timing.py, ``ptuning-plan
--search``): the pipeline formula on a case counted by hand, which links each group crosses, monotone
in the obvious directions (more bandwidth, FLOP/s, overlap or devices never slower; more work never
faster), a search that returns exactly the layouts that divide and fit, and the flags' bad inputs.
Nothing here is timed: the model's agreement with measured runs is benchmarks/plan_time_check.py's."""
from __future__ import annotations

from dataclasses import replace

import pytest

from ptuning_dist.cli.plan import main as plan_main
from ptuning_dist.errors import ConfigError
from ptuning_dist.planning.layout import PLAN_NAMES, check_layout
from ptuning_dist.planning.planner import PRESETS, GiB, plan
from ptuning_dist.planning.shape import ModelShape
from ptuning_dist.planning.timing import Rates, crossings, divisors, layer_flops, search, step_time

TOY = ModelShape("gpt2", layers=4, hidden=8, heads=2, kv_groups=2, ffn=32, vocab=10, max_positions=16,
                 tied_embeddings=True)
FREE = Rates(flops=1.0, intra=1e30, inter=1e30, latency=0.0)  # compute only, in FLOPs
BF16 = dict(dtype_bytes=2, micro_batch=1, seq_len=2048)
# layouts whose step has every term: TP, PP across nodes, ZeRO-3 over DP across nodes, recompute
LAYOUTS = [(PRESETS["gpt-20b"], 4, 8, 8, 2, dict(zero_stage=3, global_batch=512, **BF16)),
           (PRESETS["gpt-175b"], 16, 8, 8, 8, dict(zero_stage=0, global_batch=1536, checkpointing=True, **BF16)),
           (PRESETS["gpt-530b"], 280, 8, 8, 35, dict(zero_stage=3, global_batch=1920, encoder="mlp", **BF16)),
           (TOY, 2, 4, 2, 2, dict(zero_stage=3, dtype_bytes=2, micro_batch=1, global_batch=8, seq_len=4, n_prompt=3))]


def test_compute_and_pipeline_counted_by_hand():
    """TOY at tp 2 x pp 2 (4 GPUs), micro 1, global 2 (m = 2), s = 4: one layer's TP shard has
    W = qkv 12x8 + proj 8x4 + fc1 16x8 + fc2 8x16 = 384 matmul weights."""
    p = plan(TOY, 1, 4, 2, 2, zero_stage=0, dtype_bytes=2, micro_batch=1, global_batch=2, seq_len=4, n_prompt=3)
    fwd, bwd = layer_flops(p)
    attn = 4 * 1 * 4 * 4 * 8 / 2  # 4bs^2 h / tp
    assert (fwd, bwd) == (2 * 384 * 4 + attn, 2 * 384 * 4 + 2 * attn)
    t = step_time(p, FREE)
    per_micro = 2 * (fwd + bwd)  # 2 layers a stage
    # 1F1B with equal stages: (m + p - 1) t, the bubble (p - 1) / (m + p - 1) of it
    assert t.compute == 2 * per_micro and t.bubble == pytest.approx(per_micro) and t.total == pytest.approx(3 * per_micro)
    assert max(t.tp, t.pp) < 1e-20 and t.zero3 == t.dp == 0 and t.bottleneck == "compute"
    ck = step_time(replace(p, checkpointing=True), FREE)
    assert ck.compute == 2 * 2 * (2 * fwd + bwd)  # recompute: the forward again
    # with finite links and latency: each collective is latency + bytes / bandwidth, per micro-batch
    r = Rates(flops=1.0, intra=2.0, inter=2.0, latency=3.0)
    t = step_time(p, r)
    c0, c1 = p.stages[0].comm, p.stages[1].comm
    t0 = per_micro + c0.tp_allreduce / 2 / 2 + (2 * 4 + 1) * 3 + c0.pp_send / 2 / 2 + 3
    t1 = per_micro + c1.tp_allreduce / 2 / 2 + (2 * 4 + 1) * 3 + c1.pp_send / 2 / 2 + 3
    assert t.total == pytest.approx(t0 + t1 + (2 - 1) * max(t0, t1))


def test_links_follow_megatrons_rank_order():
    """rank = tp_rank + tp (dp_rank + dp stage); node = rank // gpus_per_node."""
    cross = lambda nodes, g, tp, pp: crossings(plan(PRESETS["gpt-175b"], nodes, g, tp, pp, seq_len=64))  # noqa: E731
    assert cross(2, 8, 8, 1) == {"tp": False, "dp": True, "pp": False}  # dp groups {t, t + 8}
    assert cross(2, 8, 2, 4) == {"tp": False, "dp": False, "pp": True}  # dp {t, t+2}; stage 1 (4-7) -> 2 (8-11)
    assert cross(1, 8, 4, 2) == {"tp": False, "dp": False, "pp": False}
    assert cross(2, 4, 8, 1)["tp"]  # 8-way TP over nodes of 4
    t = step_time(plan(PRESETS["gpt-175b"], 2, 8, 8, 1, seq_len=64))
    assert t.links == "tp intra, dp inter"


@pytest.mark.parametrize("shape,nodes,gpus,tp,pp,kw", LAYOUTS)
def test_monotone_in_rates(shape, nodes, gpus, tp, pp, kw):
    p = plan(shape, nodes, gpus, tp, pp, **kw)
    base = Rates()
    t = step_time(p, base)
    assert t.total > 0 and t.tokens_per_s > 0
    for faster in (replace(base, flops=2 * base.flops), replace(base, intra=2 * base.intra),
                   replace(base, inter=2 * base.inter), replace(base, latency=0.0), replace(base, overlap=0.5),
                   replace(base, copy=2 * base.copy), Rates(flops=1e16, intra=1e13, inter=1e13, latency=0.0,
                                                            overlap=1.0, copy=1e14)):
        u = step_time(p, faster)
        assert u.total <= t.total
        assert all(getattr(u, k) <= getattr(t, k) for k in ("compute", "tp", "zero3", "pp", "dp"))
    for slower in (replace(base, inter=base.inter / 10), replace(base, zero3_call=1e-3)):
        assert step_time(p, slower).total >= t.total
    assert step_time(replace(p, checkpointing=True), base).total >= t.total  # recompute never faster


def test_more_work_never_faster_and_more_devices_never_slower():
    m = PRESETS["gpt-20b"]
    # more micro-batches (a bigger global batch) on the same layout: never less compute, never faster
    prev = None
    for glob in (32, 64, 128, 512):
        t = step_time(plan(m, 4, 8, 8, 2, zero_stage=3, global_batch=glob, **BF16))
        if prev is not None:
            assert t.compute > prev.compute and t.total > prev.total
        prev = t
    # the same global batch on fewer nodes (smaller dp), ZeRO-0: never faster
    prev = None
    for nodes in (8, 4, 2, 1):
        t = step_time(plan(m, nodes, 8, 8, 1, zero_stage=0, global_batch=64, **BF16))
        if prev is not None:
            assert t.total >= prev.total
        prev = t


def test_search_returns_exactly_the_layouts_that_divide_and_fit():
    m, kw = PRESETS["gpt-175b"], dict(zero_stage=3, global_batch=1536, **BF16)
    found = search(m, 16, 8, **kw)
    assert found.fitting and found.tried == len(divisors(8)) * len(divisors(m.layers)) * 2
    times = [t.tokens_per_s for _, t in found.fitting]
    assert times == sorted(times, reverse=True)
    for p, t in found.fitting:
        assert p.fits and 8 % p.tp == 0 and p.tp * p.pp * p.dp == 128
        check_layout(m, p.tp, p.pp, 128, 1, 1536, PLAN_NAMES)  # raises if it does not divide
        assert t == step_time(p)
    # brute force over every tp and pp: the same set, and nothing left out that fits
    expect, divide = set(), 0
    for tp in range(1, 9):
        for pp in range(1, m.layers + 1):
            for ck in (False, True):
                try:
                    p = plan(m, 16, 8, tp, pp, checkpointing=ck, **kw)
                except ConfigError:
                    continue
                divide += 8 % tp == 0
                if p.fits and 8 % tp == 0:
                    expect.add((tp, pp, ck))
    assert {(p.tp, p.pp, p.checkpointing) for p, _ in found.fitting} == expect and found.divide == divide
    assert found.closest is None
    # memory too small for any layout: nothing fits, the leanest is named
    none = search(m, 16, 8, gpu_mem_bytes=4 * GiB, **kw)
    assert none.fitting == [] and none.closest is not None and not none.closest.fits
    # only the given tp / pp / checkpointing
    only = search(m, 16, 8, tps=[8], checkpointing=(True,), **kw)
    assert only.fitting and all(p.tp == 8 and p.checkpointing for p, _ in only.fitting)


def test_search_errors():
    with pytest.raises(ConfigError, match="--search: no tp x pp layout of the 8 GPUs divides"):
        search(PRESETS["gpt2-xl"], 1, 8, tps=[2])  # 25 heads
    with pytest.raises(ConfigError, match="--seq_len 4096 exceeds"):  # an input error is raised, not skipped
        search(PRESETS["gpt2-xl"], 1, 8, seq_len=4096)


def test_rates_reject_nonsense():
    for bad in (dict(flops=0), dict(intra=-1.0), dict(inter=float("nan")), dict(latency=-1e-6), dict(overlap=1.5),
                dict(copy=0.0), dict(zero3_call=-1.0)):
        with pytest.raises(ValueError):
            Rates(**bad)


def run_main(capsys, *args):
    code = plan_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_the_time_and_searches(capsys):
    code, out, _ = run_main(capsys, "--model", "gpt-20b", "--nodes", 4, "--tp", 8, "--pp", 2, "--zero_stage", 3,
                            "--dtype", "bfloat16", "--global_batch_size", 512, "--seq_len", 2048)
    lines = out.splitlines()
    assert code == 0 and lines[-1].startswith("VERDICT: fits")
    assert any(x.startswith("step time (predicted from 160 TFLOP/s a GPU, 200 GB/s within a node") for x in lines)
    assert any(" s per optimizer step, " in x and "bound by" in x for x in lines)
    code, out, _ = run_main(capsys, "--model", "gpt-20b", "--nodes", 4, "--search", "--zero_stage", 3, "--dtype",
                            "bfloat16", "--global_batch_size", 512, "--seq_len", 2048, "--top", 3,
                            "--inter_node_gbps", 50)
    lines = out.splitlines()
    assert code == 0 and lines[-1].startswith("BEST: --tp ") and "50 GB/s across nodes" in out
    rows = [x for x in lines if x.lstrip()[:2] in ("1 ", "2 ", "3 ")]
    assert len(rows) == 3
    code, out, _ = run_main(capsys, "--model", "gpt-530b", "--nodes", 2, "--search", "--seq_len", 2048)
    assert code == 1 and out.splitlines()[-1].startswith("NONE FITS: the leanest layout")
    code, out, _ = run_main(capsys, "--model", "gpt-20b", "--nodes", 4, "--search", "--tp", 4, "--seq_len", 2048,
                            "--dtype", "bfloat16", "--zero_stage", 3, "--activation_checkpointing", "--top", 50)
    assert code == 0 and " 4 x " in out and " 8 x " not in out and " off " not in out


@pytest.mark.parametrize("flag,value,message", [
    ("--gpu_tflops", 0, "--gpu_tflops must be a finite number > 0, got 0.0"),
    ("--gpu_tflops", -3, "--gpu_tflops must be a finite number > 0"),
    ("--gpu_tflops", "nan", "must be a finite number"),  # config.coerce refuses it first
    ("--intra_node_gbps", 0, "--intra_node_gbps must be a finite number > 0"),
    ("--inter_node_gbps", -25, "--inter_node_gbps must be a finite number > 0"),
    ("--inter_node_gbps", "inf", "must be a finite number"),
    ("--collective_latency_us", -1, "--collective_latency_us must be a finite number >= 0"),
    ("--zero3_fetch_us", -5, "--zero3_fetch_us must be a finite number >= 0"),
    ("--gpu_copy_gbps", 0, "--gpu_copy_gbps must be a finite number > 0"),
    ("--comm_overlap", 1.5, "--comm_overlap must be in [0, 1]"),
    ("--top", 0, "--top must be >= 1"),
    ("--gpu_tflops", "fast", "--gpu_tflops"),
])
def test_bad_rate_flags_exit_2_naming_the_flag(capsys, flag, value, message):
    for extra in ((), ("--search",)):
        code, out, err = run_main(capsys, "--model", "gpt2-xl", "--seq_len", 64, flag, value, *extra)
        assert code == 2 and out == "" and err.startswith(f"error: {flag}") and message in err, err
        assert len(err.strip().splitlines()) == 1


def test_search_with_no_dividing_layout_exits_2(capsys):
    code, out, err = run_main(capsys, "--model", "gpt2-xl", "--search", "--tp", 2, "--seq_len", 64)
    assert code == 2 and out == "" and err.startswith("error: --search: no tp x pp layout")
    assert "--tp 2 does not divide the 25 attention heads" in err


def test_zero3_gather_step_counted_by_hand_and_auto_by_memory(capsys):
    """--zero3_gather (the training flag's modes): 'layer' gathers the layers' weights for every
    micro-batch's forward and backward, 'step' once a step; the weights outside the layers once a
    step in both. TOY on 4 ranks, tp 1 x pp 1 x dp 4, m = 2 micro-batches, 2-byte weights."""
    from ptuning_dist.planning.memory import _global_params, _layer_params
    from ptuning_dist.planning.timing import _modules

    kw = dict(zero_stage=3, dtype_bytes=2, micro_batch=1, global_batch=8, seq_len=4, n_prompt=3)
    layer, step = (plan(TOY, 1, 4, 1, 1, zero3_gather=g, **kw) for g in ("layer", "step"))
    assert (layer.zero3_gather, step.zero3_gather, layer.micro_batches) == ("layer", "step", 2)
    L = TOY.layers * sum(n for n in (_n(s) for _, s, _ in _layer_params(TOY, 1)))
    O = sum(_n(s) for _, s, _ in _global_params(TOY, 1, 1, 0))
    assert layer.stages[0].comm.zero3_gather == 3 * (2 * 2 * L + O) * 2 // 4
    assert step.stages[0].comm.zero3_gather == 3 * (L + O) * 2 // 4
    # bandwidth only: every gathered byte over the link, whichever mode
    bw = Rates(flops=1e30, intra=1.0, inter=1.0, latency=0.0, copy=1e30)
    for p in (layer, step):
        assert step_time(p, bw).zero3 == pytest.approx(p.stages[0].comm.zero3_gather)
    # latency only: one call per module gathered, 2 x m a step per layer module under 'layer', once under 'step'
    lat = Rates(flops=1e30, intra=1e30, inter=1e30, latency=1.0, copy=1e30)
    modules, outside = TOY.layers * _modules(_layer_params(TOY, 1)), _modules(_global_params(TOY, 1, 1, 0))
    assert step_time(layer, lat).zero3 == pytest.approx(2 * 2 * modules + outside)
    assert step_time(step, lat).zero3 == pytest.approx(modules + outside)
    assert step_time(step).compute == step_time(layer).compute and step_time(step).total < step_time(layer).total
    # memory: 'step' holds the stage gathered (8 layers: more than 'layer''s three in flight); 'auto' takes
    # it only where it fits
    toy8 = replace(TOY, layers=8)
    layer8, step8 = (plan(toy8, 1, 4, zero3_gather=g, **kw) for g in ("layer", "step"))
    assert step8.worst.gather > layer8.worst.gather
    assert plan(toy8, 1, 4, zero3_gather="auto", **kw).zero3_gather == "step"
    between = (layer8.worst.total + step8.worst.total) // 2
    assert plan(toy8, 1, 4, zero3_gather="auto", gpu_mem_bytes=between, **kw).zero3_gather == "layer"
    assert plan(toy8, 1, 4, zero3_gather="auto", offload=True, **kw).zero3_gather == "layer"  # as the run
    # nothing gathered (no ZeRO-3, or dp 1): one mode
    assert plan(TOY, 1, 4, 1, 1, zero3_gather="step", **dict(kw, zero_stage=0)).zero3_gather == "layer"
    with pytest.raises(ConfigError, match="--zero3_gather 'often' is not one of auto, layer, step"):
        plan(TOY, 1, 4, 1, 1, zero3_gather="often", **kw)
    # the CLI: the mode in the layout line and the search's BEST line
    code, out, _ = run_main(capsys, "--model", "gpt-20b", "--nodes", 4, "--tp", 8, "--zero_stage", 3, "--dtype",
                            "bfloat16", "--global_batch_size", 512, "--seq_len", 2048, "--zero3_gather", "layer")
    assert code == 0 and "partitioned over dp 4, gathered per layer" in out
    code, out, _ = run_main(capsys, "--model", "gpt-20b", "--nodes", 4, "--search", "--zero_stage", 3, "--dtype",
                            "bfloat16", "--global_batch_size", 512, "--seq_len", 2048)
    assert code == 0 and "--zero3_gather " in out.splitlines()[-1]
    code, out, err = run_main(capsys, "--model", "gpt2-xl", "--seq_len", 64, "--zero3_gather", "often")
    assert code == 2 and out == "" and err.startswith("error: --zero3_gather")


def _n(shape) -> int:
    out = 1
    for x in shape:
        out *= x
    return out
