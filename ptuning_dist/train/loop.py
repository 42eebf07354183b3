"""The training loop: flat, one process (the parallel wiring comes from ``ptuning_dist.parallel``).

Per optimizer step::

    table_MH = encoder()                      # ONCE per step (the output depends on no input)
    table_leaf = table_MH.detach().requires_grad_()
    for each micro-batch:                     # gradient accumulation
        loss(batch, table_leaf).backward()    # dgrad through the frozen backbone -> table_leaf.grad
    table_MH.backward(table_leaf.grad)        # the encoder's forward and backward run once a step
    clip, optimizer.step(), scheduler.step()

Cutting the graph at the table means the LSTM is never re-run per micro-batch and no graph is
retained across micro-batches; the summed table gradient is exactly what backpropagating each
micro-batch through the encoder would accumulate. Only log steps touch the host (``.item()``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ptuning_dist.config import RunConfig
from ptuning_dist.data.collate import SampleStream, collate
from ptuning_dist.evaluate import evaluate
from ptuning_dist.prompt.encoder import PromptTable
from ptuning_dist.prompt.export import ENCODER_FILE, save_encoder, save_table
from ptuning_dist.train.build import build_model, build_run, examples
from ptuning_dist.model import PTuningModel


def lr_lambda(cfg: RunConfig):
    warm, total = cfg.train.warmup_steps, cfg.train.max_steps

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def train(cfg: RunConfig, log=print) -> dict:
    """Run training, evaluation and export; returns the final eval results."""
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dp, accum = cfg.check_layout(world_size=1)
    run = build_run(cfg)
    train_ex = examples(run, cfg.data.train_split)
    eval_ex = examples(run, cfg.data.eval_split)
    model, encoder = build_model(run, cfg.train.seed)
    (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log(f"backbone {run.model_path} ({sum(p.numel() for p in run.backbone.parameters()):,} frozen params, "
        f"{cfg.model.dtype}); encoder {encoder.kind} m={encoder.n_prompt} "
        f"({sum(p.numel() for p in encoder.parameters()):,} trainable); "
        f"{len(train_ex)} train / {len(eval_ex)} {cfg.data.eval_split} examples; accumulation {accum}")

    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    stream = SampleStream(len(train_ex), cfg.train.seed)
    micro = cfg.train.micro_batch_size
    metrics_f = (out / "metrics.jsonl").open("w")
    loss_sum = torch.zeros((), device=run.device)
    tokens, t_last, last_logged = 0, time.perf_counter(), 0

    bar = tqdm(range(1, cfg.train.max_steps + 1), desc="train", dynamic_ncols=True)
    for step in bar:
        idx = stream.take(cfg.train.global_batch_size)
        table_MH = encoder()
        table_leaf = table_MH.detach().requires_grad_()
        for i in range(0, len(idx), micro):
            batch = collate([train_ex[j] for j in idx[i : i + micro]], run.tok.pad_id).to(run.device)
            loss = model.loss(batch, table_leaf) / accum
            loss.backward()
            loss_sum += loss.detach()
            tokens += batch.n_tokens
        table_MH.backward(table_leaf.grad)
        if cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            mean_loss = loss_sum.item() / (step - last_logged)  # host sync: log steps only
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss is {mean_loss} at step {step}; stopping, nothing saved")
            now = time.perf_counter()
            rec = {"step": step, "loss": mean_loss, "lr": sched.get_last_lr()[0],
                   "samples": stream.consumed, "tokens_per_s": tokens / (now - t_last)}
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            loss_sum.zero_()
            tokens, t_last, last_logged = 0, now, step
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            res = evaluate(model, eval_ex, run.cands, cfg.train.eval_batch_size, run.tok.pad_id, run.device)
            log(f"step {step} eval {cfg.data.eval_split}: {_headline(res)}")
    metrics_f.close()
    save_encoder(out / ENCODER_FILE, encoder)

    # Export, then evaluate through the exported table (what inference will use) and the
    # manual-template baseline through the same code.
    table_dir = save_table(out / "prompt_table", encoder.export_table(), template=run.template.text,
                           backbone_path=str(run.model_path), backbone_hash=run.backbone_hash,
                           tokenizer=str(run.model_path), vocab_size=run.tok.vocab_size,
                           extra={"task": cfg.data.task, "encoder": encoder.kind, "steps": cfg.train.max_steps})
    table_model = PTuningModel(run.backbone, PromptTable(encoder.export_table()).to(run.device), model.candidate_ids_K)
    res = {
        "step": cfg.train.max_steps,
        "split": cfg.data.eval_split,
        "ptuning": evaluate(table_model, eval_ex, run.cands, cfg.train.eval_batch_size, run.tok.pad_id, run.device),
        "manual_baseline": evaluate(PTuningModel(run.backbone, None, model.candidate_ids_K),
                                    examples(run, cfg.data.eval_split, manual=True), run.cands,
                                    cfg.train.eval_batch_size, run.tok.pad_id, run.device),
        "prompt_table": str(table_dir),
    }
    (out / "eval.json").write_text(json.dumps(res, indent=2) + "\n")
    log(f"eval {cfg.data.eval_split}: p-tuning {_headline(res['ptuning'])} | "
        f"manual template {_headline(res['manual_baseline'])}; table -> {table_dir}")
    return res


def _headline(res: dict) -> str:
    if "accuracy" in res:
        return f"acc {res['accuracy']:.3f} macro-F1 {res['macro_f1']:.3f}"
    return f"P@1 {res['p@1_macro']:.3f} (macro over {len(res['p@1_per_relation'])} relations)"
