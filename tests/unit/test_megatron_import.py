"""The Hugging Face -> megatron name maps (backbone/families) and the megatron backend's layout rules,
in one process; the imported model's forward against HF's is tests/dist/test_megatron.py."""
from __future__ import annotations

import pytest
import torch

from ptuning_dist.backbone.families.gpt2 import GPT2, qkv_per_head
from ptuning_dist.planning.shape import padded_vocab


def test_qkv_regrouped_per_head():
    heads, hn = 2, 3
    w = torch.arange(3 * heads * hn).float()  # q0 q1 | k0 k1 | v0 v1, each hn rows
    got = qkv_per_head(w, heads).tolist()
    q, k, v = w[:6], w[6:12], w[12:]
    assert got == q[:3].tolist() + k[:3].tolist() + v[:3].tolist() + q[3:].tolist() + k[3:].tolist() + v[3:].tolist()


def test_tp_shards_reassemble_the_full_model(family_dirs):
    from ptuning_dist.backbone.megatron_import import hf_config, stage_tensors
    from ptuning_dist.backbone.safetensors_io import WeightFiles

    cfg = hf_config(family_dirs["gpt2"])
    with WeightFiles(family_dirs["gpt2"], torch.float32) as files:
        def shard(tp, rank):
            return {n: t() for n, t in stage_tensors(GPT2, files.read, cfg, tp, rank, 1, 0).items()}

        full = shard(1, 0)
        shards = [shard(2, r) for r in (0, 1)]
    dims = {"linear_qkv": 0, "linear_fc1": 0, "word_embeddings": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}
    for name, w in full.items():
        dim = next((d for k, d in dims.items() if k in name), None)
        if dim is None:
            assert torch.equal(shards[0][name], w) and torch.equal(shards[1][name], w), name
        else:
            cat = torch.cat([s[name] for s in shards], dim=dim)
            assert torch.equal(cat[: w.shape[0]] if dim == 0 else cat, w), name
    assert padded_vocab(2001, 2) == padded_vocab(2001, 1) == 2048 and padded_vocab(2001, 3) == 2304


def test_layout_checked_from_config_json(family_dirs):
    from ptuning_dist.errors import ConfigError
    from ptuning_dist.parallel.parallelize import check_megatron_model

    check_megatron_model(family_dirs["llama"], 2, 1)  # 4 heads, 2 key/value groups
    with pytest.raises(ConfigError, match="does not divide the 2 key/value groups"):
        check_megatron_model(family_dirs["llama"], 4, 1)
    with pytest.raises(ConfigError, match="does not divide the 4 attention heads"):
        check_megatron_model(family_dirs["gpt2"], 3, 1)
    with pytest.raises(ConfigError, match="parallel.pp = 3 does not divide the 2 transformer layers"):
        check_megatron_model(family_dirs["gpt2"], 1, 3)
    with pytest.raises(ConfigError, match="no importer for model_type 'gpt_neox'"):
        check_megatron_model(family_dirs["gpt_neox"], 1, 1)


def test_megatron_model_errors_name_the_path(tmp_path):
    from ptuning_dist.errors import ConfigError
    from ptuning_dist.parallel.parallelize import check_megatron_model

    with pytest.raises(ConfigError, match=r"model.path: .* \(no config.json\)"):
        check_megatron_model(tmp_path / "none", 1, 1)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="model.path .*config.json: not valid JSON"):
        check_megatron_model(tmp_path, 1, 1)
