"""The eight FewGLUE tasks from their real files (../shared/data/fewglue) through the training recipe,
a few steps each (slow tier: ~30 s in all; the metrics by hand are in tests/unit/test_fewglue.py)."""
from __future__ import annotations

import json

import pytest
import torch

from ptuning_dist.config import from_dict
from ptuning_dist.data.tasks import build_task
from ptuning_dist.train.recipe import train

# rows per split as the files hold them (MultiRC: one row per answer option; ReCoRD: per query)
SIZES = {"rte": (32, 32, 277), "cb": (32, 32, 56), "boolq": (32, 32, 3270), "wic": (32, 32, 638),
         "copa": (32, 32, 100), "wsc": (32, 32, 104), "multirc": (154, 167, 4848), "record": (32, 32, None)}
HEADLINE = {"rte": "accuracy", "cb": "macro_f1", "boolq": "accuracy", "wic": "accuracy", "copa": "accuracy",
            "wsc": "accuracy", "multirc": "f1a", "record": "f1"}


@pytest.mark.parametrize("name", list(SIZES))
def test_task_reads_its_real_files_and_trains(family_dirs, tmp_path, name):
    task = build_task(name)
    train_n, dev_n, test_n = SIZES[name]
    assert len(task.rows("train")) == train_n and len(task.rows("dev")) == dev_n
    assert task.has_split("test") == (test_n is not None)
    if test_n is not None:
        assert len(task.rows("test")) == test_n
    cfg = from_dict({}, {"model.path": str(family_dirs["gpt2"]), "data.task": name, "data.max_seq_len": 160,
                         "data.test_split": None, "train.max_steps": 2, "train.micro_batch_size": 4,
                         "train.output_dir": str(tmp_path), "train.log_every": 1})
    res = train(cfg, log=lambda *a: None)
    assert res["ptuning"]["n"] == dev_n and 0.0 <= res["ptuning"][HEADLINE[name]] <= 1.0
    assert res["selected"][name]["score"] == res["ptuning"][HEADLINE[name]]  # what selection compares
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) and v > 0 for v in losses)
