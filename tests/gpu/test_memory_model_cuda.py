"""The memory model (ptuning_dist/planning/memory.py) against the GPU's own count of allocated bytes.

A LLaMA-shaped model (8 x 512, 8 heads in 4 groups, vocabulary of the task's words) on the megatron
backend, TP=1, bf16, every row of the same length and ``--packing off``, so each forward is one known
[micro batch, sequence] shape, with and without activation checkpointing. Predicted from config.json
alone with ``layout_memory``; measured with ``torch.cuda.memory_allocated`` after set-up and
``torch.cuda.max_memory_allocated`` over the training steps (the counters reset after set-up). The
allocator's numbers are tensors only (no CUDA context, no cached free blocks): what the model predicts.

Tolerances, as the memory model states its own accuracy: the frozen bytes exactly; set-up within the
frozen weights and encoder plus 2% + 16 MiB (the candidates, RoPE's table, cuBLAS's workspace); the
training-step peak within 20% (activations are an estimate: the model counts what one layer saves
for the input gradient, not the backward's transient buffers). Both runs' numbers go to
$GPU_CHECK_OUT/memory_model_*.json whether the test passes or not.
"""
from __future__ import annotations

import pytest
from gpuutil import M, build_llama, job, run_worker, save_record, write_rte

from ptuning_dist.planning.memory import layout_memory
from ptuning_dist.planning.shape import ModelShape

SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512)
MIB = 2**20


@pytest.fixture(scope="module")
def fixed_length(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    data = write_rte(d / "RTE", n_train=32, n_dev=16, premise_words=(230, 230), hypothesis_words=(10, 10))
    return build_llama(d / "model", data, **SHAPE), data


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_model_predicts_the_gpu_peak(checkpointing, fixed_length, tmp_path):
    model, data = fixed_length
    flags = job(model, data, tmp_path / "out", "--backend", "megatron", "--dtype", "bfloat16", "--packing", "off",
                "--activation_checkpointing", str(checkpointing).lower(), "--micro_batch_size", "16",
                "--global_batch_size", "16", "--max_steps", "2")
    rec = run_worker(flags, tmp_path / "rec.json")
    shapes = {tuple(s) for step in rec["shapes"].values() for s in step}
    assert len(shapes) == 1, shapes  # one forward shape: what the prediction is made for
    (B, S), = shapes
    pred = layout_memory(ModelShape.from_hf_config(model), 1, 1, 1, dtype_bytes=2, n_prompt=M, encoder="lstm",
                         micro_batch=B, seq_len=S, checkpointing=checkpointing, backend="megatron")[0]
    held = pred.frozen_bytes + 4 * rec["encoder_numel"]  # weights and the fp32 encoder, before the optimizer
    ratio = rec["train_peak"] / pred.step_bytes
    save_record(f"memory_model_{'ckpt' if checkpointing else 'no_ckpt'}", {
        "shape": [B, S], "frozen_bytes": rec["frozen_bytes"], "predicted_frozen_bytes": pred.frozen_bytes,
        "setup_allocated": rec["setup_allocated"], "predicted_setup": held, "train_peak": rec["train_peak"],
        "predicted_step_bytes": pred.step_bytes, "predicted_activation_bytes": pred.activation_bytes,
        "predicted_encoder_bytes": pred.encoder_bytes, "ratio_measured_to_predicted": ratio})
    assert rec["device"].startswith("cuda") and rec["backbone_dtype"] == "torch.bfloat16"
    assert rec["frozen_bytes"] == pred.frozen_bytes
    assert held <= rec["setup_allocated"] <= held * 1.02 + 16 * MIB, (rec["setup_allocated"], held)
    assert abs(ratio - 1) <= 0.20, (rec["train_peak"] / MIB, pred.step_bytes / MIB)
