"""The imported megatron-core GPTModel on 1-4 gloo ranks (TP = world size; GPT-2, LLaMA, Mistral, Qwen2) against Hugging Face's
own forward, and the fused splice on the vocabulary shard against the reference path."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from distutil import ROOT

from ptuning_dist.parallel.launch import free_port


@pytest.mark.parametrize("family,tp", [("gpt2", 1), ("gpt2", 2), ("llama", 1), ("llama", 2), ("mistral", 2),
                                       ("qwen2", 2), ("qwen2", 4)])  # every family sharded; TP 4 with GQA
def test_megatron_forward_and_splice_equal_hf_and_reference(sharded_dirs, tmp_path, tp, family):
    """Read shard-wise from many small safetensors files (conftest.sharded_dirs)."""
    out = tmp_path / "r.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--master_port",
                        str(free_port()), ROOT / "tests" / "workers" / "megatron_worker.py", sharded_dirs[family], out],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["tp"] == tp and res["max_abs_diff"] < 2e-5, res  # seen: <= 3.1e-6
    assert res["head_full_diff"] < 2e-5 and res["head_cands_diff"] < 2e-5 and res["embed_diff"] == 0, res
    # the fused splice on the vocabulary shard (prompt rows and positions written on TP rank 0) is the
    # reference path bit for bit, [s, b, h], the prompt gradient the same on every TP rank
    assert res["splice_equal"] and res["splice_grad_equal"] and res["splice_grad_same_on_tp_ranks"], res
    assert res["splice_shape"] == [7, 3, res["hidden"]], res
    # candidate answers of several tokens: the sums of HF's own log-probabilities, on this TP layout
    assert res["scoring_diff"] < 1e-4 and res["scoring_pad_is_inf"], res
    # a wrong QKV order (GPT-2) or a naive split of the fused gate/up matrix (LLaMA) is caught
    assert res["wrong_mapping_diff"] > 1e3 * max(res["max_abs_diff"], 1e-6), res
