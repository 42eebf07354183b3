"""One prompt per group in one run (prompt/groups.py, prompt/batched.py, the recipe), and the
budgets: epochs, best-on-dev selection, early stopping (train/select.py)."""
from __future__ import annotations

import json

import pytest
import torch

from ptuning_dist.backbone.tiny import default_backbone
from ptuning_dist.config import from_dict
from ptuning_dist.errors import CheckpointError, ConfigError
from ptuning_dist.prompt.batched import PromptEncoders
from ptuning_dist.prompt.encoder import PromptEncoder
from ptuning_dist.prompt.export import load_table
from ptuning_dist.prompt.groups import PromptGroups, group_seed
from ptuning_dist.train.build import build_run, examples
from ptuning_dist.train.recipe import PTuningRecipe, train
from ptuning_dist.train.checkpoint import read_state

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return default_backbone(tmp_path_factory.mktemp("tiny") / "backbone")


def cfg_for(tiny_dir, out, **over):
    base = {"model.path": str(tiny_dir), "train.output_dir": str(out), "train.log_every": 1}
    return from_dict({}, {**base, **over})


# ---- the batched encoders against G separate encoders --------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "mlp", "embedding"])
def test_batched_encoders_equal_separate_encoders(kind):
    groups = PromptGroups(("a", "b", "c", "d"), (3, 5, 3, 3))  # two slot counts: two batched buckets
    enc = PromptEncoders(kind, groups, 32, seed=11)
    table = enc()
    assert table.shape == (14, 32) and table.dtype == torch.float32
    # the reference: each group's own PromptEncoder (torch's nn.LSTM), its rows where groups.rows says
    ref = torch.cat([e() for e in enc.encoders])
    torch.testing.assert_close(table, ref, rtol=1e-5, atol=1e-6)
    for name, e in zip(groups.names, enc.encoders):
        a, b = groups.rows(name)
        torch.testing.assert_close(table[a:b], e(), rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(table)
    (table * weight).sum().backward()
    got = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    (torch.cat([e() for e in enc.encoders]) * weight).sum().backward()
    for g, p in zip(got, enc.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_a_groups_output_and_gradient_do_not_depend_on_the_other_groups():
    """Bit for bit: what one run over several groups against single-group runs rests on."""
    alone = PromptEncoders("lstm", PromptGroups.of(["P36"], 3), 32, seed=5)
    both = PromptEncoders("lstm", PromptGroups.of(["P36", "P37"], 3), 32, seed=5)
    for p, q in zip(alone.encoders[0].parameters(), both.encoders[0].parameters()):
        assert torch.equal(p, q)  # a group's initial weights come from (seed, its name) only
    ta, tb = alone(), both()
    assert torch.equal(ta, tb[:3]) and not torch.equal(tb[:3], tb[3:])
    w = torch.randn(3, 32)
    (ta * w).sum().backward()
    (tb[:3] * w).sum().backward()
    for p, q in zip(alone.encoders[0].parameters(), both.encoders[0].parameters()):
        assert torch.equal(p.grad, q.grad)
    assert all(not p.grad.any() for p in both.encoders[1].parameters())


def test_groups_mapping_and_sidecar_checks():
    g = PromptGroups(("x", "y"), (2, 4))
    assert g.offsets == (0, 2) and g.total == 6 and g.rows("y") == (2, 6)
    assert PromptGroups.from_json(g.to_json(), "t") == g
    for bad in ({}, {"x": [0, 2], "y": [3, 6]}, {"x": [0, 0]}, {"x": "0:2"}):
        with pytest.raises(CheckpointError, match="groups|rows"):
            PromptGroups.from_json(bad, "t")
    assert group_seed(7, "shared") == 7 and group_seed(7, "P36") != group_seed(7, "P37")


def test_slots_index_their_groups_rows(tiny_dir, tmp_path):
    run = build_run(cfg_for(tiny_dir, tmp_path), torch.device("cpu"))
    assert run.groups.to_json() == {"P36": [0, 6], "P37": [6, 12]}
    for e in examples(run, "train"):
        lo, hi = run.groups.rows(e.group)
        assert e.pgroup == run.groups.index(e.group) and all(lo <= s < hi for s in e.enc.prompt_slot)
    shared = build_run(cfg_for(tiny_dir, tmp_path, **{"prompt.sharing": "shared"}), torch.device("cpu"))
    assert shared.groups.to_json() == {"shared": [0, 6]}
    assert {s for e in examples(shared, "train") for s in e.enc.prompt_slot} == set(range(6))


# ---- training: groups apart, budgets, selection ----------------------------------------------------

def _by_group(tiny_dir, out, **over):
    # the whole vocabulary as candidates: the default task's 'objects' would differ with the relations
    return cfg_for(tiny_dir, out, **{"data.batching": "by_group", "train.lr_schedule": "constant",
                                     "train.micro_batch_size": 8, "data.allowed_vocab": "full", **over})


def test_one_run_over_two_groups_equals_two_separate_runs_bit_for_bit(tiny_dir, tmp_path):
    """Steps alternate P36, P37 (data.batching = by_group): each group's table equals the table of a
    run over that relation alone, with the same rows in the same order."""
    train(_by_group(tiny_dir, tmp_path / "both", **{"train.max_steps": 6}), **QUIET)
    both, meta = load_table(tmp_path / "both" / "prompt_table")
    for rel in ("P36", "P37"):
        train(_by_group(tiny_dir, tmp_path / rel, **{"train.max_steps": 3, "data.relations": rel}), **QUIET)
        alone, _ = load_table(tmp_path / rel / "prompt_table")
        a, b = meta["groups"].rows(rel)
        assert torch.equal(both[a:b], alone), rel


def test_a_group_absent_from_a_step_is_not_moved(tiny_dir, tmp_path):
    seen = {}

    class Observed(PTuningRecipe):
        def optimizer_step(self, step):
            p37 = self.encoder.group_parameters(1)
            seen.setdefault("before", [p.detach().clone() for p in p37])
            super().optimizer_step(step)
            seen[step] = ([p.detach().clone() for p in p37], [self.opt.state.get(p) for p in p37],
                          [p.detach().clone() for p in self.encoder.group_parameters(0)])

    cfg = _by_group(tiny_dir, tmp_path, **{"train.max_steps": 3, "train.weight_decay": 0.1})
    Observed(cfg, **QUIET).run()
    params1, state1, p36_1 = seen[1]  # step 1 holds P36's rows only
    assert all(torch.equal(a, b) for a, b in zip(params1, seen["before"]))  # not even weight decay
    assert all(s is None or not s for s in state1)  # no AdamW moment, no step count
    params2, state2, _ = seen[2]  # step 2 trains P37
    assert not all(torch.equal(a, b) for a, b in zip(params2, params1)) and all(s for s in state2)
    params3, state3, p36_3 = seen[3]  # step 3: P36 again, P37 untouched since step 2
    assert all(torch.equal(a, b) for a, b in zip(params3, params2)) and not torch.equal(p36_3[0], p36_1[0])
    assert all(int(s["step"]) == 1 for s in state3)


def test_epochs_best_on_dev_and_the_exported_table(tiny_dir, tmp_path):
    """48 training rows / global batch 16 -> 3 steps an epoch; 4 epochs = 12 steps, evaluated after
    each epoch; every step checkpointed to read the selected step's encoder back."""
    cfg = cfg_for(tiny_dir, tmp_path, **{"train.epochs": 4, "train.eval_every_epoch": True, "train.save_every": 1,
                                         "train.keep_checkpoints": 20, "train.lr": 2e-2})
    res = train(cfg, **QUIET)
    assert json.loads((tmp_path / "run_config.json").read_text())["train"]["max_steps"] == 12
    curve = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in curve if "eval_split" in r]
    assert [r["step"] for r in curve] == [3, 6, 9, 12]
    table, meta = load_table(tmp_path / "prompt_table")
    for rel in ("P36", "P37"):
        scores = [r["group_scores"][rel] for r in curve]
        best = max(scores)
        step = curve[scores.index(best)]["step"]  # the first evaluation reaching the best
        assert res["selected"][rel] == {"step": step, "score": best}
        assert res["ptuning"]["p@1_per_relation"][rel] == best  # the exported table scores its best
        state = read_state(tmp_path / "checkpoints" / f"step_{step:08d}")
        g = meta["groups"].index(rel)
        enc = PromptEncoders("lstm", meta["groups"], table.shape[1])
        enc.load_state_dict(state["encoder"])
        a, b = meta["groups"].rows(rel)
        assert torch.equal(enc.export_table()[a:b], table[a:b]), rel
        assert g == ("P36", "P37").index(rel)
    assert res["test"]["split"] == "test" and json.loads((tmp_path / "eval.json").read_text())["selected"]


def test_patience_stops_early(tiny_dir, tmp_path):
    # lr so small the predictions cannot change: no group improves after the first evaluation
    cfg = cfg_for(tiny_dir, tmp_path, **{"train.max_steps": 20, "train.eval_every": 2, "train.patience": 2,
                                         "train.lr": 1e-12})
    res = train(cfg, **QUIET)
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_split" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and [r["improved"] for r in evals] == [True, False, False]
    assert res["step"] == 6 and {s["step"] for s in res["selected"].values()} == {2}
    assert (tmp_path / "checkpoints" / "step_00000006").is_dir()  # --resume finds the stopped run


def test_budget_and_group_config_errors():
    with pytest.raises(ConfigError, match="train.max_steps/epochs"):
        from_dict({}, {"train.max_steps": 5, "train.epochs": 2})
    for bad in (0, -1, float("inf")):
        with pytest.raises(ConfigError, match="train.epochs"):
            from_dict({}, {"train.epochs": bad})
    with pytest.raises(ConfigError, match="prompt.sharing"):
        from_dict({}, {"prompt.sharing": "per_row"})
    with pytest.raises(ConfigError, match="train.patience"):
        from_dict({}, {"train.patience": -1})
    cfg = from_dict({}, {"train.epochs": 2.5, "train.micro_batch_size": 4})
    cfg.layout(2)  # global batch 8 on 2 ranks: epochs count the global stream
    assert cfg.resolve_steps(48) == 6 and cfg.train.max_steps == 15
    default = from_dict({}, {})
    default.layout(1)
    default.resolve_steps(48)
    assert default.train.max_steps == 300


def test_resume_refuses_other_groups(tiny_dir, tmp_path):
    train(cfg_for(tiny_dir, tmp_path, **{"train.max_steps": 2}), **QUIET)
    with pytest.raises(CheckpointError, match="prompt groups"):
        train(cfg_for(tiny_dir, tmp_path, **{"train.max_steps": 4, "prompt.sharing": "shared",
                                             "train.resume": "auto"}), **QUIET)
    _ = PromptEncoder  # the single-group module the batched one stacks (imported for the reader)
