"""In-process training and evaluation on the embedded tiny backbone (fast tier, one process)."""
from __future__ import annotations

import json

import pytest
import torch

from ptuning_dist.backbone.tiny import default_backbone
from ptuning_dist.config import from_dict
from ptuning_dist.data.collate import SampleStream, collate
from ptuning_dist.errors import ConfigError
from ptuning_dist.train.evaluate import predict
from ptuning_dist.model import PTuningModel
from ptuning_dist.prompt.encoder import PromptTable
from ptuning_dist.prompt.export import load_table
from ptuning_dist.train.build import build_model, build_run, examples
from ptuning_dist.train.recipe import train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return default_backbone(tmp_path_factory.mktemp("tiny") / "backbone")


def cfg_for(tiny_dir, out, **over):
    base = {"model.path": str(tiny_dir), "train.output_dir": str(out), "train.log_every": 1}
    base.update(over)
    return from_dict({}, base)


def test_training_lowers_loss_and_writes_outputs(tiny_dir, tmp_path):
    res = train(cfg_for(tiny_dir, tmp_path, **{"train.max_steps": 40}), log=lambda *a: None)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 41))
    for r in recs:
        assert {"step", "loss", "lr", "samples", "tokens_per_s"} <= set(r)
    first, last = sum(r["loss"] for r in recs[:5]) / 5, sum(r["loss"] for r in recs[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert recs[-1]["samples"] == 40 * 16
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["ptuning"] == res["ptuning"] and "manual_baseline" in saved
    assert set(saved["ptuning"]["p@1_per_relation"]) == {"P36", "P37"}
    table, meta = load_table(tmp_path / "prompt_table")
    assert table.shape == (12, 64) and meta["template"] == "[P*3] {sub_label} [P*3]"  # a prompt per relation
    assert meta["groups"].to_json() == {"P36": [0, 6], "P37": [6, 12]}
    assert set(saved["selected"]) == {"P36", "P37"} and saved["selected"]["P36"]["step"] == 40
    assert saved["test"]["split"] == "test" and set(saved["test"]["ptuning"]["p@1_per_relation"]) == {"P36", "P37"}


def _grads_after_one_step(tiny_dir, tmp_path, micro):
    """Encoder gradients and loss of step 1, computed as the trainer does (table cut, accumulation)."""
    cfg = cfg_for(tiny_dir, tmp_path, **{"train.micro_batch_size": micro, "train.global_batch_size": 16})
    _, accum = cfg.layout(1)
    run = build_run(cfg, torch.device("cpu"))
    ex = examples(run, "train")
    model, encoder = build_model(run, seed=7)
    idx = SampleStream(len(ex), seed=3).take(16)
    table = encoder()
    leaf = table.detach().requires_grad_()
    total = 0.0
    for i in range(0, 16, micro):
        loss = model.loss(collate([ex[j] for j in idx[i : i + micro]], run.tok.pad_id), leaf) / accum
        loss.backward()
        total += loss.item()
    table.backward(leaf.grad)
    return total, {n: p.grad.clone() for n, p in encoder.named_parameters()}, model, ex, idx, run


def test_accumulation_with_cut_table_equals_one_full_batch(tiny_dir, tmp_path):
    loss_a, grads_a, model, ex, idx, run = _grads_after_one_step(tiny_dir, tmp_path, micro=4)
    loss_b, grads_b, *_ = _grads_after_one_step(tiny_dir, tmp_path, micro=16)
    # Reference: plain autograd through the encoder on the whole batch, no cut.
    model.prompt.zero_grad()
    ref = model.loss(collate([ex[j] for j in idx], run.tok.pad_id))
    ref.backward()
    assert loss_a == pytest.approx(ref.item(), abs=1e-6) and loss_b == pytest.approx(ref.item(), abs=1e-6)
    for n, p in model.prompt.named_parameters():
        torch.testing.assert_close(grads_a[n], p.grad, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(grads_b[n], p.grad, atol=1e-7, rtol=1e-5)
        assert p.grad.abs().sum() > 0, f"no gradient reached {n}"


def test_backbone_frozen_and_only_encoder_trains(tiny_dir, tmp_path):
    run = build_run(cfg_for(tiny_dir, tmp_path), torch.device("cpu"))
    model, encoder = build_model(run, seed=0)
    before = {n: p.clone() for n, p in run.backbone.named_parameters()}
    ex = examples(run, "train")
    model.loss(collate(ex[:4] + ex[-4:], run.tok.pad_id)).backward()  # rows of both relations: every prompt
    assert all(p.grad is None for p in run.backbone.parameters())
    assert all(p.grad is not None for p in encoder.parameters())
    assert all(torch.equal(before[n], p) for n, p in run.backbone.named_parameters())


@pytest.mark.parametrize("kind", ["lstm", "mlp", "embedding"])
def test_eval_through_table_equals_eval_through_encoder(tiny_dir, tmp_path, kind):
    run = build_run(cfg_for(tiny_dir, tmp_path, **{"prompt.encoder": kind}), torch.device("cpu"))
    model, encoder = build_model(run, seed=1)
    with torch.no_grad():  # move the encoder away from its init so the check is not trivial
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ex = examples(run, "dev")
    via_encoder = predict(model, ex, 5, run.tok.pad_id, "cpu")
    table_model = PTuningModel(run.backbone, PromptTable(encoder.export_table()), model.candidate_ids_K)
    via_table = predict(table_model, ex, 7, run.tok.pad_id, "cpu")
    assert via_encoder == via_table
    batch = collate(ex, run.tok.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(batch), table_model.logits(batch), atol=0, rtol=0)


def test_manual_baseline_uses_relation_templates(tiny_dir, tmp_path):
    run = build_run(cfg_for(tiny_dir, tmp_path), torch.device("cpu"))
    manual = examples(run, "dev", manual=True)
    assert all(not e.enc.prompt_pos for e in manual)
    first = [e for e in manual if e.group == "P36"][0]
    text = run.tok.decode(first.enc.ids)
    assert text.startswith("The capital of") and text.endswith("is")


def test_layout_and_batch_checks():
    cfg = from_dict({}, {"train.micro_batch_size": 4, "train.global_batch_size": 16})
    assert cfg.layout(1) == (1, 4)
    assert cfg.layout(2) == (2, 2)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        cfg.layout(3)
    with pytest.raises(ConfigError, match="parallel.tp x parallel.pp = 2 x 1 = 2 does not divide the world size 3"):
        from_dict({}, {"parallel.tp": 2}).layout(3)
    with pytest.raises(ConfigError, match="train.lrr: unknown field"):
        from_dict({"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match="optim: unknown config section"):
        from_dict({"optim": {}})
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        from_dict({}, {"train.lr": "fast"})
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        from_dict({}, {"train.max_steps": 1.5})
    with pytest.raises(ConfigError, match="prompt.encoder"):
        from_dict({}, {"prompt.encoder": "gru"})
    with pytest.raises(ConfigError, match="model.dtype"):
        from_dict({}, {"model.dtype": "int8"})
    assert from_dict({}, {"data.relations": "P36,P37"}).data.relations == ["P36", "P37"]
    unset = from_dict({}, {"train.micro_batch_size": 8})
    assert unset.layout(2) == (2, 1) and unset.train.global_batch_size == 16


def test_bf16_backbone_keeps_fp32_encoder_and_learns(tiny_dir, tmp_path):
    cfg = cfg_for(tiny_dir, tmp_path, **{"model.dtype": "bfloat16", "train.max_steps": 30})
    run = build_run(cfg, torch.device("cpu"))
    model, encoder = build_model(run, seed=0)
    assert run.backbone.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    ex = examples(run, "train")
    model.loss(collate(ex[:4] + ex[-4:], run.tok.pad_id)).backward()  # rows of both relations: every prompt
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in encoder.parameters())
    train(cfg, log=lambda *a: None)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_activation_checkpointing_bit_identical_single_process(tiny_dir, tmp_path):
    from ptuning_dist.parallel.checkpointing import apply_activation_checkpointing

    results = []
    for ac in (False, True):
        run = build_run(cfg_for(tiny_dir, tmp_path), torch.device("cpu"))
        model, encoder = build_model(run, seed=0)
        if ac:
            assert apply_activation_checkpointing(run.backbone) == 2
        batch = collate(examples(run, "train")[:8], run.tok.pad_id)
        loss = model.loss(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in encoder.parameters()]))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_fused_and_reference_splice_train_bit_identically(tiny_dir, tmp_path):
    """Ten training steps with ``ptuning::splice`` (the C++ CPU kernel) and with the reference
    splice: the same losses and the same final encoder, bit for bit."""
    losses, weights = {}, {}
    for kind in ("reference", "fused"):
        out = tmp_path / kind
        train(cfg_for(tiny_dir, out, **{"train.max_steps": 10, "model.splice": kind}), log=lambda *a: None)
        losses[kind] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        from safetensors.torch import load_file
        weights[kind] = load_file(str(out / "encoder.safetensors"))
    assert losses["fused"] == losses["reference"] and len(losses["fused"]) == 10
    assert all(torch.equal(weights["fused"][k], w) for k, w in weights["reference"].items())


def test_recipe_stages_run_in_order_and_can_be_observed(tiny_dir, tmp_path):
    """The recipe's seams (what benchmarks and tests override instead of patching the module): set-up
    in its fixed order, then per step its forwards' collation, the optimizer step (the encoder's
    gradients final there) and the between-steps hooks, then the export and evaluation."""
    from ptuning_dist.train.recipe import PTuningRecipe

    calls = []

    class Observed(PTuningRecipe):
        def optimizer_step(self, step):
            calls.append(("optimizer_step", step, all(p.grad is not None for p in self.encoder.parameters())))
            super().optimizer_step(step)

    for name in ("build", "parallelize", "build_optimizer", "resume", "collate", "maybe_log", "maybe_save",
                 "maybe_eval", "finish"):
        def observed(self, *a, _name=name, **k):
            calls.append(_name)
            return getattr(PTuningRecipe, _name)(self, *a, **k)
        setattr(Observed, name, observed)
    cfg = cfg_for(tiny_dir, tmp_path, **{"train.max_steps": 3, "train.eval_every": 2, "data.packing": "off",
                                         "train.micro_batch_size": 8, "train.global_batch_size": 16})
    res = Observed(cfg, log=lambda *a: None).run()
    step = lambda k: ["collate", "collate", ("optimizer_step", k, True), "maybe_log", "maybe_save", "maybe_eval"]  # noqa: E731
    assert calls == ["build", "parallelize", "build_optimizer", "resume", *step(1), *step(2), *step(3), "finish"]
    assert res["step"] == 3 and json.loads((tmp_path / "eval.json").read_text())["ptuning"] == res["ptuning"]
