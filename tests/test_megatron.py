"""megatron-core GPTModel on CPU, imported from Hugging Face GPT-2 and sharded for TP, against HF."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptuning_dist.backbone.megatron_import import _qkv_per_head, gpt2_to_megatron, padded_vocab
from ptuning_dist.parallel.launch import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_qkv_regrouped_per_head():
    heads, hn = 2, 3
    w = torch.arange(3 * heads * hn).float()  # q0 q1 | k0 k1 | v0 v1, each hn rows
    got = _qkv_per_head(w, heads).tolist()
    q, k, v = w[:6], w[6:12], w[12:]
    assert got == q[:3].tolist() + k[:3].tolist() + v[:3].tolist() + q[3:].tolist() + k[3:].tolist() + v[3:].tolist()


def test_tp_shards_reassemble_the_full_model(family_dirs):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(family_dirs["gpt2"])
    state = hf.state_dict()
    full = gpt2_to_megatron(state, hf.config, tp=1, rank=0)
    shards = [gpt2_to_megatron(state, hf.config, tp=2, rank=r) for r in (0, 1)]
    dims = {"linear_qkv": 0, "linear_fc1": 0, "word_embeddings": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}
    for name, w in full.items():
        dim = next((d for k, d in dims.items() if k in name), None)
        if dim is None:
            assert torch.equal(shards[0][name], w) and torch.equal(shards[1][name], w), name
        else:
            cat = torch.cat([s[name] for s in shards], dim=dim)
            assert torch.equal(cat[: w.shape[0]] if dim == 0 else cat, w), name
    assert padded_vocab(2001, 2) == 2002


@pytest.mark.dist
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_forward_and_splice_equal_hf_and_reference(family_dirs, tmp_path, tp, family):
    out = tmp_path / "r.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--master_port",
                        str(free_port()), ROOT / "tests" / "megatron_worker.py", family_dirs[family], out],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["tp"] == tp and res["max_abs_diff"] < 2e-5, res  # seen: <= 3.1e-6
    assert res["head_full_diff"] < 2e-5 and res["head_cands_diff"] < 2e-5 and res["embed_diff"] == 0, res
    # the fused splice on the vocabulary shard (prompt rows and positions written on TP rank 0) is the
    # reference path bit for bit, [s, b, h], the prompt gradient the same on every TP rank
    assert res["splice_equal"] and res["splice_grad_equal"] and res["splice_grad_same_on_tp_ranks"], res
    assert res["splice_shape"] == [7, 3, res["hidden"]], res
    # a wrong QKV order (GPT-2) or a naive split of the fused gate/up matrix (LLaMA) is caught
    assert res["wrong_mapping_diff"] > 1e3 * max(res["max_abs_diff"], 1e-6), res


def test_layout_checked_from_config_json(family_dirs):
    from ptuning_dist.backbone.megatron_import import check_layout
    from ptuning_dist.errors import ConfigError

    check_layout(family_dirs["llama"], 2)  # 4 heads, 2 key/value groups
    with pytest.raises(ConfigError, match="does not divide the 2 key/value groups"):
        check_layout(family_dirs["llama"], 4)
    with pytest.raises(ConfigError, match="does not divide the 4 attention heads"):
        check_layout(family_dirs["gpt2"], 3)
    with pytest.raises(ConfigError, match="parallel.pp = 3 does not divide the 2 transformer layers"):
        check_layout(family_dirs["gpt2"], 1, 3)
    with pytest.raises(ConfigError, match="no importer for model_type 'gpt_neox'"):
        check_layout(family_dirs["gpt_neox"], 1)
