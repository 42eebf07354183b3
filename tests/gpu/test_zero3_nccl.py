"""DeepSpeed ZeRO-3 on one GPU over NCCL (DeepSpeed's CUDA accelerator, bf16 from the JSON): the same
job as the plain one-GPU hf run, whose losses it must reproduce (the same bf16 weights gathered from
one partition: the same arithmetic up to the order of a few reductions, so within 2%, gradient
cosine >= 0.995)."""
from __future__ import annotations

import json

from gpuutil import ROOT, RUN, cosine, grads, job, rel_diff, run_worker, save_record


def test_zero3_one_rank_over_nccl(small_llama, rte, hf_bf16, tmp_path):
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["bf16"] = {"enabled": True}
    (tmp_path / "zero3_bf16.json").write_text(json.dumps(ds))
    rec = run_worker(job(small_llama, rte, tmp_path / "out", "--dtype", "bfloat16", "--ds_config",
                         tmp_path / "zero3_bf16.json", *RUN), tmp_path / "rec.json")
    cos = cosine(grads(rec), grads(hf_bf16))
    save_record("zero3_nccl", {"losses": rec["losses"], "plain_losses": hf_bf16["losses"], "grad_cosine": cos,
                               "record": rec})
    assert rec["dist_backend"] == "nccl" and rec["device"].startswith("cuda"), rec
    assert rec["zero3"] and rec["splice"] == "triton" and rec["backbone_dtype"] == "torch.bfloat16"
    assert rel_diff(rec["losses"], hf_bf16["losses"]) <= 2e-2, (rec["losses"], hf_bf16["losses"])
    assert cos >= 0.995, cos
