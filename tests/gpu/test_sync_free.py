"""A training step makes no host sync: step 2 (after step 1 compiled the Triton kernels and set up
cuBLAS and cuDNN) runs under ``torch.cuda.set_sync_debug_mode("error")``, so any synchronizing CUDA
call in it (``.item()``, a blocking copy to or from the host, ``nonzero``, a tensor's truth value)
raises with its traceback (the worker's stderr, shown on failure). Only log and save steps touch
the host (train/recipe.py); step 2 of 3 with ``--log_every 100`` is neither."""
from __future__ import annotations

import pytest
from gpuutil import job, run_worker, save_record


@pytest.mark.parametrize("backend,extra", [("hf", []), ("megatron", ["--activation_checkpointing", "true"])])
def test_training_step_without_host_syncs(backend, extra, small_llama, rte, tmp_path):
    flags = job(small_llama, rte, tmp_path / "out", "--dtype", "bfloat16", "--backend", backend, *extra)
    flags += ["--max_steps", "3", "--log_every", "100"]  # later flags win: step 2 neither logs nor saves
    rec = run_worker(flags, tmp_path / "rec.json", worker_flags=["--sync_steps", "2"])
    save_record(f"sync_free_{backend}", rec)
    assert rec["device"].startswith("cuda") and rec["splice"] == "triton"
    assert rec["sync_checked"] == [2] and all(rec["packed"].values()), rec
