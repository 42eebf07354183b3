"""The dry-run planner (ptuning_dist/parallel/planner.py, launchers/plan.py): preset sizes, the
communication formulas on a case small enough to count by hand, the per-stage rows against the
per-rank memory model, verdicts, every invalid-layout rule, the launcher's exit codes, speed at
4096 GPUs; and (dist, slow) its predictions against measured runs of small models on this machine."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptuning_dist.errors import ConfigError
from ptuning_dist.planning.memory import layout_memory, rank_coords
from ptuning_dist.planning.shape import ModelShape
from ptuning_dist.planning.planner import PRESETS, GiB, plan
from ptuning_dist.cli.plan import main as plan_main

ROOT = Path(__file__).resolve().parents[2]
# 4 layers, h 8, 2 heads of 4, ffn 32, vocab 10, 16 learned positions: counted by hand below
TOY = ModelShape("gpt2", layers=4, hidden=8, heads=2, kv_groups=2, ffn=32, vocab=10, max_positions=16,
                 tied_embeddings=True)


def test_presets_have_their_advertised_sizes():
    assert PRESETS["gpt2-xl"].hf_num_params() == 1_557_611_200  # Hugging Face's gpt2-xl count
    for name, billions in (("gpt-20b", 20), ("gpt-175b", 175), ("gpt-530b", 530)):
        assert abs(PRESETS[name].hf_num_params() / (billions * 1e9) - 1) < 0.02, name


def test_comm_counted_by_hand():
    """tp 2 x pp 2 x dp 2, micro 1, global 4 (M = 2 micro-batches per DP rank), s = 4, bf16, ZeRO-3."""
    p = plan(TOY, 2, 4, 2, 2, zero_stage=3, dtype_bytes=2, micro_batch=1, global_batch=4, seq_len=4, n_prompt=3)
    assert (p.dp, p.micro_batches, [(r.first, r.last) for r in p.stages]) == (2, 2, [(0, 0), (1, 1)])
    # one layer's TP shard: 2 norms 16 + proj 8x4 + 8 + qkv 12x8 + 12 + fc1 16x8 + 16 + fc2 8x16 + 8 = 460;
    # outside the layers (vocabulary 10 padded to 128: 64 rows per TP rank): stage 0 words 64x8 + positions
    # 16x8 = 640, stage 1 the head's copy 64x8 + final norm 16 = 528
    layer, out0, out1, sbh = 460, 640, 528, 4 * 1 * 8
    s0, s1 = p.stages[0].comm, p.stages[1].comm
    # ZeRO-3: (dp-1)/dp x (2 gathers x M x 2 layers x layer + outside once) x 2 bytes
    assert s0.zero3_gather == (2 * 2 * 2 * layer + out0) * 2 // 2
    assert s1.zero3_gather == (2 * 2 * 2 * layer + out1) * 2 // 2
    # TP ring: 2(tp-1)/tp = 1 x M x (2 layers x 4 x sbh + splice sbh | head b*h) x 2 bytes
    assert (s0.tp_allreduce, s1.tp_allreduce) == (2 * (2 * 4 * sbh + sbh) * 2, 2 * (2 * 4 * sbh + 8) * 2)
    assert (s0.pp_send, s1.pp_send) == (2 * sbh * 2, 2 * sbh * 2)  # M x one direction each at the ends
    assert (s0.dp_allreduce, s1.dp_allreduce) == (3 * 8 * 4, 0)  # ring over dp 2: 1 x m x h fp32, stage 0 only
    g4 = plan(TOY, 2, 4, 2, 2, zero_stage=3, dtype_bytes=2, micro_batch=1, global_batch=4, seq_len=4, n_prompt=3,
              prompt_groups=4)  # four groups' rows of the stacked table, four encoders
    assert g4.stages[0].comm.dp_allreduce == 4 * 3 * 8 * 4 and g4.stages[0].encoder == 4 * p.stages[0].encoder
    ck = plan(TOY, 2, 4, 2, 2, zero_stage=3, dtype_bytes=2, micro_batch=1, global_batch=4, seq_len=4, n_prompt=3,
              checkpointing=True)
    assert ck.stages[0].comm.tp_allreduce == 2 * (2 * 6 * sbh + sbh) * 2  # recompute: 2 more per layer
    assert ck.stages[0].comm.zero3_gather == s0.zero3_gather  # the recompute reuses the backward's gather
    inner = plan(TOY, 1, 4, 1, 4, zero_stage=0, dtype_bytes=2, micro_batch=1, global_batch=3, seq_len=4, n_prompt=3)
    assert [r.comm.pp_send for r in inner.stages] == [3 * sbh * 2, 2 * 3 * sbh * 2, 2 * 3 * sbh * 2, 3 * sbh * 2]
    assert all(r.comm.zero3_gather == r.comm.tp_allreduce == r.comm.dp_allreduce == 0 for r in inner.stages)


@pytest.mark.parametrize("shape,nodes,gpus,tp,pp,zero,glob", [
    (TOY, 2, 4, 2, 2, 3, 8), (TOY, 1, 8, 1, 4, 0, 12), (PRESETS["gpt2-xl"], 1, 8, 1, 2, 3, 16),
    (ModelShape("llama", 4, 64, 8, 2, 96, 1001, 64, False), 2, 4, 2, 2, 3, 8)])
def test_stage_rows_are_the_memory_model_of_every_rank(shape, nodes, gpus, tp, pp, zero, glob):
    seq = min(64, shape.max_positions)
    kw = dict(dtype_bytes=2, micro_batch=2, seq_len=seq, n_prompt=6)
    p = plan(shape, nodes, gpus, tp, pp, zero_stage=zero, global_batch=glob, **kw)
    dp, M = p.dp, p.micro_batches
    mem = {c: layout_memory(shape, tp, pp, dp, partitioning="zero3" if zero == 3 else "none", micro_batches=M,
                            checkpointing=c, **kw) for c in (False, True)}
    assert sum(r.ranks for r in p.stages) == nodes * gpus
    for rank in range(nodes * gpus):
        stage = rank_coords(rank, tp, pp, dp)[0]
        row = next(r for r in p.stages if r.first <= stage <= r.last)
        a, b = mem[False][rank], mem[True][rank]
        assert (row.frozen, row.encoder, row.act, row.gather, row.load) == \
            (a.frozen_bytes, a.encoder_bytes, a.activation_bytes, a.gather_bytes, a.load_bytes)
        assert row.act_ckpt == b.activation_bytes and row.total == a.step_bytes


def test_identical_stages_are_grouped():
    """One micro-batch per step: every stage keeps one in flight, so the inner stages are identical."""
    p = plan(TOY, 1, 8, 2, 4, zero_stage=3, dtype_bytes=2, micro_batch=1, seq_len=8)
    assert [(r.first, r.last, r.ranks) for r in p.stages] == [(0, 0, 2), (1, 2, 4), (3, 3, 2)]


def test_verdicts():
    fits = plan(PRESETS["gpt2-xl"], 1, 8, 1, 1, seq_len=1024, global_batch=64)
    assert fits.fits and fits.verdict.startswith("fits: the fullest ranks (stage 0) need")
    big = plan(PRESETS["gpt-530b"], 280, 8, 8, 35, global_batch=1920, seq_len=2048, checkpointing=True)
    assert not big.fits and big.worst.first == 0 and big.worst.encoder > 80 * GiB  # the LSTM encoder alone
    assert big.verdict.startswith("does not fit: stage 0 needs") and "GiB over" in big.verdict
    assert "64 of 2240 ranks (stages 0) exceed" in big.verdict
    kw = dict(global_batch=1536, seq_len=2048, gpu_mem_bytes=54 * GiB)  # between the peaks without (57.4) and with (48.5) checkpointing
    no_ck = plan(PRESETS["gpt-175b"], 16, 8, 8, 8, **kw)
    assert not no_ck.fits and no_ck.verdict.endswith("and it fits")  # points at checkpointing
    assert plan(PRESETS["gpt-175b"], 16, 8, 8, 8, checkpointing=True, **kw).fits


@pytest.mark.parametrize("shape,args,kw,message", [
    (PRESETS["gpt2-xl"], (1, 8, 2, 1), {}, "does not divide: --tp 2 does not divide the 25 attention heads"),
    (ModelShape("llama", 4, 64, 8, 2, 96, 1000, 64, False), (1, 8, 4, 1), {},
     "--tp 4 does not divide the 2 key/value groups"),
    (ModelShape("llama", 4, 64, 8, 8, 100, 1000, 64, False), (1, 8, 8, 1), {}, "--tp 8 does not divide the 100 ffn"),
    (PRESETS["gpt-530b"], (4, 8, 8, 2), {}, "--pp 2 does not divide the 105 transformer layers"),
    (PRESETS["gpt-175b"], (3, 8, 8, 8), {}, "--tp x --pp = 8 x 8 = 64 does not divide the world of --nodes 3 x "
                                           "--gpus-per-node 8 = 24 GPUs"),
    (PRESETS["gpt2-xl"], (1, 8, 1, 1), {"global_batch": 12},
     "--global_batch_size 12 is not a multiple of --micro_batch_size 1 x dp 8 = 8"),
    (PRESETS["gpt2-xl"], (1, 8, 1, 1), {"seq_len": 2048}, "--seq_len 2048 exceeds the 1024 learned positions"),
    (PRESETS["gpt2-xl"], (0, 8, 1, 1), {}, "--nodes: must be a positive integer"),
])
def test_invalid_layouts_name_the_rule(shape, args, kw, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        plan(shape, *args, **kw)


def test_530b_on_4096_gpus_is_a_few_lines_in_milliseconds():
    t0 = time.perf_counter()
    flat = plan(PRESETS["gpt-530b"], 512, 8, 8, 1, global_batch=4096, seq_len=2048)
    deep = plan(PRESETS["gpt-530b"], 560, 8, 8, 35, global_batch=1920, seq_len=2048)
    assert time.perf_counter() - t0 < 0.5
    assert (flat.world, flat.dp, len(flat.stages)) == (4096, 512, 1)
    assert deep.world == 4480 and len(deep.stages) <= 35


def launch(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "launchers" / "plan.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_launcher_exit_codes_and_verdicts():
    runs = [launch("--model", "gpt2-xl", "--ds_config", ROOT / "ds_configs" / "zero3.json", "--seq_len", 1024),
            launch("--model", "gpt-530b", "--nodes", 280, "--tp", 8, "--pp", 35, "--zero_stage", 3, "--dtype",
                   "bfloat16", "--global_batch_size", 1920, "--seq_len", 2048, "--activation_checkpointing"),
            launch("--model", "gpt2-xl", "--tp", 3)]
    (ok, ok_err), (no, _), (bad, bad_err) = (p.communicate(timeout=120) for p in runs)
    assert [p.returncode for p in runs] == [0, 1, 2], (ok_err, bad_err)
    assert "ZeRO-3: frozen weights partitioned over dp 8, gathered per step; fp32 (4 bytes)" in ok
    assert ok.splitlines()[-1].startswith("VERDICT: fits:")
    assert no.splitlines()[-1].startswith("VERDICT: does not fit: stage 0 needs")
    assert bad_err.strip() == "error: does not divide: --tp 3 does not divide the 25 attention heads of gpt2-xl"
    assert bad == ""


def run_main(capsys, *args):
    code = plan_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_inputs(capsys, tmp_path):
    code, _, err = run_main(capsys, "--model", "gpt-3")
    assert code == 2 and "neither a preset (gpt2-xl, gpt-20b, gpt-175b, gpt-530b)" in err
    code, _, err = run_main(capsys, "--model", "gpt2-xl", "--ds_config", tmp_path / "none.json")
    assert code == 2 and err.startswith("error: --ds_config: file not found")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                              "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    code, _, err = run_main(capsys, "--model", "gpt2-xl", "--ds_config", ds, "--micro_batch_size", 2, "--seq_len", 64)
    assert code == 2 and "train_micro_batch_size_per_gpu = 4 contradicts --micro_batch_size 2" in err
    code, _, err = run_main(capsys, "--model", "gpt2-xl", "--ds_config", ds, "--zero_stage", 0, "--seq_len", 64)
    assert code == 2 and "zero_optimization.stage = 3 contradicts --zero_stage 0" in err
    code, out, _ = run_main(capsys, "--model", "gpt2-xl", "--ds_config", ds, "--seq_len", 64)  # micro 4 from the JSON
    assert code == 0 and "global 32 = micro 4 x 1 micro-batches per step x dp 8" in out
    assert "offloaded to the host, gathered per layer; bf16/fp16 (2 bytes)" in out and "frozen (host)" in out
    ds.write_text(json.dumps({"gradient_accumulation_steps": 4, "train_batch_size": "auto"}))
    code, out, _ = run_main(capsys, "--model", "gpt2-xl", "--ds_config", ds, "--seq_len", 64)
    assert code == 0 and "global 32 = micro 1 x 4 micro-batches per step x dp 8" in out and "ZeRO-0" in out
    code, _, err = run_main(capsys, "--model", "gpt2-xl", "--ds_config", ds, "--seq_len", 64, "--global_batch_size", 16)
    assert code == 2 and "gradient_accumulation_steps = 4 contradicts global 16 / (micro 1 x dp 8) = 2" in err
    # a Hugging Face config.json (directory): LLaMA-7B's shape, then with grouped-query attention
    llama = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
             "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
             "max_position_embeddings": 4096}
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(llama))
    code, out, _ = run_main(capsys, "--model", tmp_path / "llama", "--tp", 8, "--pp", 4, "--nodes", 4)
    assert code == 0 and "llama: llama-style, 32 layers" in out and "6.74 B parameters" in out
    (tmp_path / "gqa.json").write_text(json.dumps({**llama, "num_key_value_heads": 8}))
    code, _, err = run_main(capsys, "--model", tmp_path / "gqa.json", "--tp", 16, "--nodes", 2)
    assert code == 2 and "--tp 16 does not divide the 8 key/value groups" in err
