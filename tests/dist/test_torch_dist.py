"""megatron-core ``torch_dist`` checkpoints: the converter (``launchers/convert.py``) and loading
them at another TP/PP (``backbone/megatron_dist.py``) over gloo, against the direct shard-wise
import of the Hugging Face source, bit for bit; training from one against the single-process run;
bad checkpoints refused with one line."""
from __future__ import annotations

import json
import pickle
import sys

import pytest
from distutil import COMMON, LLAMA_RTE, ROOT, WORKER, losses, run, torchrun

from ptuning_dist.backbone.hf import fingerprint

CONVERT = ROOT / "launchers" / "convert.py"
CHECK = ROOT / "tests" / "workers" / "torch_dist_worker.py"


def convert(src, out, world, *layout):
    torchrun(world, CONVERT, "--model", src, "--out", out, *layout)
    return out


def check(src, td, world, tp, pp, out):
    torchrun(world, CHECK, src, td, tp, pp, out)
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for rec in recs:
        assert rec["keys"] and rec["unequal"] == [], rec
    assert sorted(tuple(r["coords"]) for r in recs) == sorted((t, p) for t in range(tp) for p in range(pp)
                                                              for _ in range(world // (tp * pp)))
    return recs


@pytest.fixture(scope="module")
def llama_td(sharded_dirs, tmp_path_factory):
    """The untied LLaMA (GQA) converted at TP = 2."""
    return convert(sharded_dirs["llama"], tmp_path_factory.mktemp("td") / "llama", 2, "--tp", 2)


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (2, 1, 2), (4, 2, 2)])
def test_converted_at_tp2_loads_at_any_layout(sharded_dirs, llama_td, tmp_path, world, tp, pp):
    check(sharded_dirs["llama"], llama_td, world, tp, pp, tmp_path)
    rec = json.loads((llama_td / "ptuning_checkpoint.json").read_text())
    assert rec["fingerprint"] == fingerprint(sharded_dirs["llama"]) and rec["dtype"] == "float32"


def test_tied_head_across_pipeline_layouts(sharded_dirs, tmp_path):
    """Mistral with a tied head converted at PP = 2 (the last stage's own copy is not written as a
    second tensor) loads at PP = 1 and at TP = 2."""
    td = convert(sharded_dirs["mistral"], tmp_path / "mistral", 2, "--pp", 2)
    check(sharded_dirs["mistral"], td, 1, 1, 1, tmp_path / "a")
    check(sharded_dirs["mistral"], td, 2, 2, 1, tmp_path / "b")


def test_training_from_torch_dist_matches_single_process(backbone, reference, tmp_path):
    """The default GPT-2 converted at TP = 2, trained at PP = 2: the single-process losses, and the
    run records the Hugging Face source's fingerprint (prompt tables move between the two)."""
    td = convert(backbone, tmp_path / "td", 2, "--tp", 2)
    out = tmp_path / "run"
    torchrun(2, WORKER, "--record", out / "rec", "--model", td, "--output_dir", out, "--backend", "megatron",
             "--pp", 2, *COMMON)
    a, b = losses(reference), losses(out)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    table = json.loads((out / "prompt_table" / "prompt_table.json").read_text())
    assert table["backbone"]["fingerprint"] == fingerprint(backbone)


def test_bad_torch_dist_checkpoints(sharded_dirs, llama_td, tmp_path):
    import shutil

    def refused(d, *want):  # from the launcher: exit 2, one error line, before any step
        out = tmp_path / ("out_" + d.name)
        p = run([sys.executable, ROOT / "launchers" / "train.py", "--model", d, "--backend", "megatron",
                 "--output_dir", out, "--max_steps", 1, *LLAMA_RTE], ok=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and last.startswith("error: ") and all(w in last for w in want), p.stderr[-3000:]
        assert not (out / "metrics.jsonl").exists()

    other = shutil.copytree(llama_td, tmp_path / "other")  # a config of another size beside the weights
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (other / "config.json").write_text(json.dumps(cfg))
    refused(other, str(other), "mlp.linear_fc", "global shape", "config.json beside it implies")

    cut = shutil.copytree(sharded_dirs["llama"], tmp_path / "cut")  # a truncated safetensors shard
    index = json.loads((cut / "model.safetensors.index.json").read_text())["weight_map"]
    victim = cut / index["model.layers.1.mlp.down_proj.weight"]
    victim.write_bytes(victim.read_bytes()[:-64])
    refused(cut, f"{victim}: truncated: tensor '")  # names the file's first tensor past its end

    evil = shutil.copytree(llama_td, tmp_path / "evil")  # metadata that would run code when unpickled

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    (evil / ".metadata").write_bytes(pickle.dumps(Boom()))
    refused(evil, ".metadata", "refusing builtins.print")

    p = run([sys.executable, CONVERT, "--model", sharded_dirs["llama"],
             "--out", llama_td], ok=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --out:"), p.stderr
