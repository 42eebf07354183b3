"""The DeepSpeed JSON is checked against the run config (no process group needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptuning_dist.config import from_dict
from ptuning_dist.errors import ConfigError
from ptuning_dist.parallel.ds_config import load_ds_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, d):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(d))
    return p


def cfg(**over):
    return from_dict({}, {"train.micro_batch_size": 4, "train.global_batch_size": 16, **over})


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero0.json"])
def test_shipped_configs_fill_auto_from_run_config(name):
    d, dtype = load_ds_config(ROOT / "ds_configs" / name, cfg(), world_size=2)
    assert (d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"], d["train_batch_size"]) == (4, 2, 16)
    assert d["gradient_clipping"] == 1.0 and dtype == "float32"
    assert d["zero_optimization"]["stage"] == (0 if name == "zero0.json" else 3)


def test_explicit_values_must_agree(tmp_path):
    ok = write(tmp_path, {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})
    load_ds_config(ok, cfg(), 2)
    with pytest.raises(ConfigError, match=r"train_batch_size = 32 contradicts train.global_batch_size = 16"):
        load_ds_config(write(tmp_path, {"train_batch_size": 32}), cfg(), 2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 4 contradicts"):
        load_ds_config(write(tmp_path, {"gradient_accumulation_steps": 4}), cfg(), 2)
    with pytest.raises(ConfigError, match="train.global_batch_size"):  # 16 is not 4 x accum x 3
        load_ds_config(write(tmp_path, {}), cfg(), 3)
    with pytest.raises(ConfigError, match="gradient_clipping"):
        load_ds_config(write(tmp_path, {"gradient_clipping": 5.0}), cfg(), 2)


def test_bad_stage_dtypes_and_optimizer(tmp_path):
    with pytest.raises(ConfigError, match="zero_optimization.stage = 4"):
        load_ds_config(write(tmp_path, {"zero_optimization": {"stage": 4}}), cfg(), 1)
    with pytest.raises(ConfigError, match="bf16.enabled and fp16.enabled are both true"):
        load_ds_config(write(tmp_path, {"bf16": {"enabled": True}, "fp16": {"enabled": True}}), cfg(), 1)
    with pytest.raises(ConfigError, match=r"fp16 needs a GPU.*use bf16 on CPU"):
        load_ds_config(write(tmp_path, {"fp16": {"enabled": True}}), cfg(), 1)
    d, dtype = load_ds_config(write(tmp_path, {"bf16": {"enabled": True}}), cfg(), 1)
    assert dtype == "bfloat16"
    with pytest.raises(ConfigError, match="model.dtype = float16"):
        load_ds_config(write(tmp_path, {"bf16": {"enabled": True}}), cfg(**{"model.dtype": "float16"}), 1)
    with pytest.raises(ConfigError, match="optimizer.params.lr = 0.1 contradicts train.lr"):
        load_ds_config(write(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}), cfg(), 1)
    d, _ = load_ds_config(write(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                                           "scheduler": {"type": "WarmupLR"}}), cfg(), 1)
    assert "optimizer" not in d and "scheduler" not in d  # the encoder's AdamW lives outside DeepSpeed
    with pytest.raises(ConfigError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        load_ds_config(tmp_path / "bad.json", cfg(), 1)
    with pytest.raises(ConfigError, match="file not found"):
        load_ds_config(tmp_path / "missing.json", cfg(), 1)


def test_zero3_gather_auto_stays_per_layer_under_offload():
    """offload_param keeps the frozen weights off the device: 'auto' does not gather the whole stage
    back for the step (the planner plans the same, tests/unit/test_planner_time.py); an explicit mode stands."""
    from ptuning_dist.parallel.zero import choose_gather

    gather, why = choose_gather("auto", None, None, None, None, 0, 0, offload=True)
    assert gather == "layer" and "offload_param" in why
    assert choose_gather("step", None, None, None, None, 0, 0, offload=True)[0] == "step"
