"""Shard-wise HF -> megatron import (backbone/megatron_import.py, safetensors_io.py) on every
(TP rank, pipeline stage) in one process: bit-equal to the whole-model import it replaced
(tests/import_oracle.py), reading exactly the bytes each rank holds, and one clear error for
each kind of bad file. The forward against Hugging Face's is tests/dist/test_megatron.py."""
from __future__ import annotations

import json

import pytest
import torch
from import_oracle import whole_model_stage

from ptuning_dist.backbone.families import family
from ptuning_dist.backbone.megatron_import import hf_config, stage_tensors
from ptuning_dist.backbone.safetensors_io import WeightFiles
from ptuning_dist.errors import CheckpointError

LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)]


def _stage(model_dir, dtype, tp, rank, pp, stage):
    cfg = hf_config(model_dir)
    files = WeightFiles(model_dir, dtype)
    got = {k: t() for k, t in stage_tensors(family(cfg.model_type), files.read, cfg, tp, rank, pp, stage).items()}
    files.close()
    return got, files


@pytest.fixture(scope="module")
def hf_models(sharded_dirs):
    from transformers import AutoModelForCausalLM

    return {f: AutoModelForCausalLM.from_pretrained(d) for f, d in sharded_dirs.items()}


@pytest.mark.parametrize("fam", ["gpt2", "llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_equals_the_whole_model_import_bit_for_bit(sharded_dirs, hf_models, fam, tp, pp):
    for dtype in (torch.float32, torch.bfloat16):
        for rank in range(tp):
            for stage in range(pp):
                want = whole_model_stage(hf_models[fam], dtype, tp, rank, pp, stage)
                got, files = _stage(sharded_dirs[fam], dtype, tp, rank, pp, stage)
                assert sorted(got) == sorted(want), (rank, stage)
                for name, w in want.items():
                    assert got[name].dtype == dtype and torch.equal(got[name], w), (name, rank, stage, dtype)
                # every byte read is a byte this rank holds (the zero rows padding the vocabulary are not read)
                real = {n: w.shape[0] - (max(0, (rank + 1) * w.shape[0] - _vocab(hf_models[fam])) if "word_emb" in n
                                         or "output_layer" in n else 0) for n, w in want.items()}
                held = sum(max(0, min(real[n], w.shape[0])) * w[0].numel() for n, w in want.items())
                assert files.bytes_read == held * 4, (rank, stage)  # the files are fp32


def _vocab(hf):
    return hf.config.vocab_size


def test_reads_only_its_files_and_its_share(sharded_dirs):
    """At TP 2 x PP 2 a rank of the 2-layer model reads about a quarter of the layer bytes: the
    files of the other stage's layers are never opened."""
    d = sharded_dirs["llama"]
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    total = sum((d / f).stat().st_size for f in set(index.values()))
    _, full = _stage(d, torch.float32, 1, 0, 1, 0)
    assert 0.99 * total < full.bytes_read <= total  # TP 1 x PP 1 reads everything once (headers aside)
    for stage in (0, 1):
        got, files = _stage(d, torch.float32, 2, 1, 2, stage)
        other = {f for n, f in index.items() if n.startswith(f"model.layers.{1 - stage}.")}
        mine = {f for n, f in index.items() if n.startswith(f"model.layers.{stage}.")}
        assert not other & set(files.files_opened) - mine, stage
        assert files.bytes_read < 0.5 * full.bytes_read


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_files_are_one_error_naming_file_and_tensor(sharded_dirs, tmp_path):
    src = sharded_dirs["llama"]

    def err(d):
        with pytest.raises(CheckpointError) as e:
            _stage(d, torch.float32, 2, 0, 1, 0)
        return str(e.value)

    d = _copy(src, tmp_path / "missing")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (d / victim).unlink()
    assert victim in err(d) and "model.safetensors.index.json" in err(d)

    d = _copy(src, tmp_path / "truncated")
    path = d / victim
    path.write_bytes(path.read_bytes()[:-100])
    assert f"{path}: truncated" in err(d) and "model.layers.1.mlp.up_proj.weight" in err(d)

    d = _copy(src, tmp_path / "shape")  # config says a wider MLP than the files hold
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (d / "config.json").write_text(json.dumps(cfg))
    msg = err(d)
    assert "has shape" in msg and "implies" in msg and ".safetensors" in msg and "mlp." in msg

    d = _copy(src, tmp_path / "garbage")
    (d / victim).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert f"{d / victim}: not a safetensors file" in err(d)

    d = _copy(src, tmp_path / "lost")  # the index forgets a tensor the config needs
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "no tensor 'model.layers.0.self_attn.k_proj.weight'" in err(d)

    d = tmp_path / "none"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    for f in ("pytorch_model.bin",):
        (d / f).write_bytes(b"")
    assert "has no model.safetensors.index.json or model.safetensors" in err(d)


def test_single_file_models_load_too(family_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    d = family_dirs["gpt2"]
    assert (d / "model.safetensors").is_file()
    hf = AutoModelForCausalLM.from_pretrained(d)
    got, files = _stage(d, torch.float32, 2, 1, 1, 0)
    want = whole_model_stage(hf, torch.float32, 2, 1, 1, 0)
    assert all(torch.equal(got[n], w) for n, w in want.items()) and files.files_opened == ["model.safetensors"]


def test_mistral_window_refused_where_it_would_bind(sharded_dirs, tmp_path):
    """The megatron backend attends over the whole sequence: a Mistral window shorter than the
    run's sequences is refused at build, before any process group or weight read."""
    from ptuning_dist.config import from_dict
    from ptuning_dist.errors import ConfigError
    from ptuning_dist.train.build import build_run

    cfg = from_dict({}, {"model.path": str(sharded_dirs["mistral"]), "model.backend": "megatron", "data.task": "rte",
                         "data.max_seq_len": 300, "train.output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="data.max_seq_len = 300 exceeds .*config.json's sliding_window 256"):
        build_run(cfg, torch.device("cpu"))
