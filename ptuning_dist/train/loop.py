"""The training loop: flat, the same on 1 rank or DP ranks under DeepSpeed ZeRO.

Set-up order: configs checked against the world size (before any process group) -> process
group (-> megatron's TP x DP groups) -> tokenizer, task, backbone built, loaded (ZeRO-3:
partitioned while loading; megatron: TP-sharded while importing) and frozen -> encoder (seeded,
then broadcast from rank 0) -> activation-checkpoint wrapping -> ZeRO engine or FSDP2 over the
frozen part -> optimizer -> resume.

Per optimizer step, on every rank::

    table_MH = encoder()                      # ONCE per step (the output depends on no input)
    table_leaf = table_MH.detach().requires_grad_()
    for each of this rank's forwards:         # gradient accumulation (packed: data/packing.py)
        (sum of CE / rows).backward()         # dgrad through the frozen backbone -> table_leaf.grad
    all_reduce(table_leaf.grad) / dp          # m x h floats: cheaper than the encoder's gradients
    table_MH.backward(table_leaf.grad)        # the encoder's forward and backward run once a step
    clip, optimizer.step(), scheduler.step()

Cutting the graph at the table means the LSTM is never re-run per micro-batch, no graph is
retained across micro-batches, and the data-parallel all-reduce moves m x h numbers. Every rank
then computes the same encoder gradient from the same averaged table gradient, so the replicas
stay identical (tested). Only log and save steps touch the host (``.item()``, RNG gathers).
"""
from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ptuning_dist.backbone.megatron_import import check_layout
from ptuning_dist.config import RunConfig
from ptuning_dist.errors import ConfigError
from ptuning_dist.data.collate import SampleStream, collate
from ptuning_dist.data.packing import step_forwards
from ptuning_dist.evaluate import evaluate
from ptuning_dist.parallel import launch
from ptuning_dist.parallel.checkpointing import apply_activation_checkpointing
from ptuning_dist.parallel.ds_config import load_ds_config, zero_stage
from ptuning_dist.parallel.fsdp import shard_frozen_fsdp2
from ptuning_dist.parallel.pipeline import PipelineSchedule
from ptuning_dist.parallel.zero import held_for_step, hf_zero3_context, shard_frozen
from ptuning_dist.prompt.export import ENCODER_FILE, save_encoder, save_table
from ptuning_dist.train import checkpoint as ckpt
from ptuning_dist.train.faults import maybe_fail
from ptuning_dist.train.stop import StopRequested, StopWatch
from ptuning_dist.train.build import build_model, build_run, examples, resolve_model_path

_NONE = 2**62  # "no non-finite loss yet"


def lr_lambda(cfg: RunConfig):
    warm, total = cfg.train.warmup_steps, cfg.train.max_steps

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def train(cfg: RunConfig, log=print, hooks=None) -> dict:
    """Run training, evaluation and export; returns the final eval results (on every rank).

    ``hooks`` (for tests and diagnostics) may define ``after_setup(model, encoder, engine)`` and
    ``after_backward(step, encoder)`` (encoder gradients final, before clipping and the update;
    ``encoder`` is None on pipeline stages after the first)."""
    with StopWatch(Path(cfg.train.output_dir)) as stop:  # SIGUSR1/SIGTERM or <output_dir>/STOP: see stop.py
        return _train(cfg, log, hooks, stop)


def _train(cfg: RunConfig, log, hooks, stop: StopWatch) -> dict:
    _check_supported(cfg)
    _, world = launch.env_world()
    dp, accum = cfg.check_layout(world)
    ds_cfg = None
    if cfg.parallel.ds_config:
        ds_cfg, cfg.model.dtype = load_ds_config(cfg.parallel.ds_config, cfg, world)
    megatron = cfg.model.backend == "megatron"
    D = launch.init(need_group=ds_cfg is not None or megatron or cfg.parallel.fsdp2,
                    timeout_s=cfg.parallel.dist_timeout_s)
    if megatron:
        launch.init_model_parallel(cfg.parallel.tp, cfg.parallel.pp)
    dp_rank, _, dp_group = launch.data_parallel()  # TP replicas and pipeline stages share a DP rank
    say = log if D.is_main else (lambda *a, **k: None)
    out = Path(cfg.train.output_dir)
    if D.is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolve_model_path(cfg)  # builds the embedded default backbone once, before others read it
        stop.clear_stale_file(say)
    D.barrier()
    # before loading: the checkpoint read whole is then returned when freed
    heap = launch.HostHeap(D.device, partitioned=dp > 1 and (zero_stage(ds_cfg) == 3 or cfg.parallel.fsdp2))

    # ZeRO-3 of an HF backbone: partitioned while it loads (megatron imports whole, then partitions)
    hf_ctx = hf_zero3_context(ds_cfg) if zero_stage(ds_cfg) == 3 and not megatron else None  # noqa: F841
    run = build_run(cfg, D.device)
    if megatron:  # the embedded default is only known now; a given path was checked before any group
        check_layout(run.model_path, cfg.parallel.tp, cfg.parallel.pp)
    train_ex, eval_ex = examples(run, cfg.data.train_split), examples(run, cfg.data.eval_split)
    model, encoder = build_model(run, cfg.train.seed)  # encoder: None on pipeline stages after the first
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(run.backbone)
    engine = shard_frozen(model, ds_cfg, megatron) if ds_cfg is not None else None
    if cfg.parallel.fsdp2:
        shard_frozen_fsdp2(model, dp_group)
    del hf_ctx
    pipeline = PipelineSchedule(model) if cfg.parallel.pp > 1 else None
    if encoder is not None:
        launch.broadcast_replicas(encoder)  # identical replicas from the first step on
    if hooks is not None and hasattr(hooks, "after_setup"):
        hooks.after_setup(model, encoder, engine)

    opt = sched = None
    if encoder is not None:
        opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    stream = SampleStream(len(train_ex), cfg.train.seed)
    backbone_id = {"path": str(run.model_path), "fingerprint": run.backbone_hash}
    start = ckpt.resume(cfg, out, run.backbone_hash, encoder, opt, sched, stream, D, say)
    if D.is_main:  # rank 0 is on the first pipeline stage: it holds the encoder
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        say(f"backbone {run.model_path} ({cfg.model.dtype}, {cfg.model.backend} backend, tp {cfg.parallel.tp}, "
            f"pp {cfg.parallel.pp}, ZeRO stage {zero_stage(ds_cfg)}, dp {dp}); "
            f"encoder {encoder.kind} m={encoder.n_prompt} ({sum(p.numel() for p in encoder.parameters()):,} "
            f"trainable); {len(train_ex)} train / {len(eval_ex)} {cfg.data.eval_split} examples; "
            f"accumulation {accum}")

    G, micro, per_rank = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.global_batch_size // dp
    release = engine.optimizer.release_backward_leftovers if zero_stage(ds_cfg) == 3 else (lambda: None)
    # ZeRO-3: what the splice and head read directly (embedding table, head, ...) is gathered once
    # per step and per evaluation, not once per micro-batch forward (costs: held for the whole step)
    hold = partial(held_for_step, engine if zero_stage(ds_cfg) == 3 else None,
                   model.backbone.directly_read_parameters())
    pack_to = cfg.pack_to if pipeline is None else None
    forward_backward = pipeline.train_step if pipeline is not None else partial(_forward_backward, model)
    metrics_f = _open_metrics(out, start) if D.is_main else None
    stats = torch.zeros(2, dtype=torch.float64, device=D.device)  # loss sum, tokens since the last log
    first_bad = torch.full((), _NONE, dtype=torch.long, device=D.device)
    t_last, last_logged = time.perf_counter(), start

    bar = tqdm(range(start + 1, cfg.train.max_steps + 1), desc="train", dynamic_ncols=True, disable=not D.is_main,
               initial=start, total=cfg.train.max_steps, mininterval=1.0)
    for step in bar:
        maybe_fail("step", step)
        idx = stream.take(G)
        rows_by_rank = [[train_ex[j] for j in idx[r * per_rank : (r + 1) * per_rank]] for r in range(dp)]
        rows = rows_by_rank[dp_rank]
        if pack_to is not None:  # hf backend: packed forwards, each within a padded micro-batch's positions
            groups = step_forwards(rows_by_rank, dp_rank, micro, pack_to)
        else:
            groups = [rows[i : i + micro] for i in range(0, per_rank, micro)]
        # a pipeline sends one activation shape per step: pad to the step's longest row (a host int)
        seq_len = max(len(e.enc.ids) for e in rows) if pipeline is not None else None
        batches = [collate(g, run.tok.pad_id, seq_len, pack_to).to(D.device) for g in groups]
        table_MH = table_leaf = None
        if encoder is not None:
            table_MH = encoder()
            table_leaf = table_MH.detach().requires_grad_()
        with hold():
            step_loss = forward_backward(batches, table_leaf)
            release()  # ZeRO-3: re-partition what a recomputed block left gathered
        stats[1] += sum(b.n_tokens for b in batches)
        if encoder is not None:
            grad_MH = table_leaf.grad
            if dp > 1:  # over DP only: TP replicas already hold the same table gradient
                dist.all_reduce(grad_MH, group=dp_group)
                grad_MH /= dp
            table_MH.backward(grad_MH)
        if hooks is not None and hasattr(hooks, "after_backward"):
            hooks.after_backward(step, encoder)
        if encoder is not None:
            if cfg.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.train.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        heap.after_step()  # CPU, PTUNING_HOST_MALLOC=trim: return the heap pages ZeRO-3's gathers fragmented
        stats[0] += step_loss  # zero on pipeline stages before the last
        first_bad = torch.where(torch.isfinite(step_loss) | (first_bad != _NONE), first_bad, step)

        saving = cfg.train.save_every and step % cfg.train.save_every == 0 or step == cfg.train.max_steps
        if step % cfg.train.log_every == 0 or saving:
            _check_finite(first_bad, D)  # host sync: log and save steps only
            if pipeline is not None:  # the loss lives on the last stage
                dist.all_reduce(stats[:1], group=pipeline.group)
            if dp > 1:
                dist.all_reduce(stats, group=dp_group)
            loss_sum, tokens = stats.tolist()  # host sync: log steps only
            now = time.perf_counter()
            rec = {"step": step, "loss": loss_sum / dp / (step - last_logged),
                   "lr": sched.get_last_lr()[0] if sched else None, "samples": stream.consumed,
                   "tokens_per_s": tokens / (now - t_last)}
            if D.is_main:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            stats.zero_()
            t_last, last_logged = now, step
        if saving:
            ckpt.save_step(out, step, cfg, encoder, opt, sched, stream, backbone_id, D)
        if (step % cfg.train.log_every == 0 or saving) and step < cfg.train.max_steps and stop.agreed(D):
            if not saving:  # a preempted job loses nothing: checkpoint this step, then leave together
                ckpt.save_step(out, step, cfg, encoder, opt, sched, stream, backbone_id, D)
            if metrics_f:
                metrics_f.close()
            if D.is_main:
                stop.mark_stopped(step)
            raise StopRequested(step, stop.reason)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            with hold():
                res = evaluate(model, eval_ex, run.cands, cfg.train.eval_batch_size, run.tok.pad_id, D.device,
                               pipeline=pipeline, pack_to=pack_to)
            say(f"step {step} eval {cfg.data.eval_split}: {_headline(res)}")
    if metrics_f:
        metrics_f.close()
    with hold():
        return _finish(cfg, out, run, model, encoder, eval_ex, D, say, pipeline)


def _forward_backward(model, batches, table_leaf) -> torch.Tensor:
    """One pipeline stage (PP = 1): each forward's summed loss / the step's rows backpropagates into
    table_leaf.grad (forwards may hold different numbers of rows: packed ones are filled by size)."""
    step_loss = torch.zeros((), device=batches[0].ids_BS.device)
    rows = sum(len(b.label_B) for b in batches)
    for batch in batches:
        loss = model.loss(batch, table_leaf, reduction="sum") / rows
        loss.backward()
        step_loss += loss.detach()
    return step_loss


def _check_supported(cfg: RunConfig) -> None:
    """Refuse the layouts that are not built, before anything starts."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if (tp > 1 or pp > 1) and cfg.model.backend != "megatron":
        raise ConfigError(f"parallel.tp = {tp}, parallel.pp = {pp}: tensor and pipeline parallelism need "
                          "model.backend = megatron (--backend megatron)")
    if cfg.model.backend == "megatron" and cfg.model.path is not None:
        check_layout(cfg.model.path, tp, pp)
    if cfg.parallel.fsdp2 and cfg.parallel.ds_config:
        raise ConfigError("parallel.fsdp2 and parallel.ds_config both partition the backbone; choose one")


def _check_finite(first_bad: torch.Tensor, D) -> None:
    if D.world > 1:
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    bad = int(first_bad)
    if bad != _NONE:
        raise FloatingPointError(f"non-finite loss at step {bad}; stopping without writing a checkpoint")


def _open_metrics(out: Path, start: int):
    """Append after a resume, dropping lines a killed run wrote past the checkpoint."""
    path = out / "metrics.jsonl"
    keep = []
    if start and path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
    f = path.open("w")
    for line in keep:
        f.write(line + "\n")
    return f


def _finish(cfg, out, run, model, encoder, eval_ex, D, say, pipeline) -> dict:
    """Export the table, then evaluate through it (what inference uses) and the manual baseline.
    Pipeline stages after the first have no table: their layers do not read it."""
    table_MH = encoder.export_table().to(D.device) if encoder is not None else None
    if D.is_main:
        save_encoder(out / ENCODER_FILE, encoder)
        save_table(out / "prompt_table", table_MH, template=run.template.text,
                   backbone_path=str(run.model_path), backbone_hash=run.backbone_hash,
                   tokenizer=str(run.model_path), vocab_size=run.tok.vocab_size,
                   extra={"task": cfg.data.task, "encoder": encoder.kind, "steps": cfg.train.max_steps})
    bs, pad, pack_to = cfg.train.eval_batch_size, run.tok.pad_id, cfg.pack_to if pipeline is None else None
    no_prompt = torch.zeros((0, run.backbone.hidden_size), device=D.device)
    res = {
        "step": cfg.train.max_steps,
        "split": cfg.data.eval_split,
        "ptuning": evaluate(model, eval_ex, run.cands, bs, pad, D.device, table_MH, pipeline, pack_to),
        "manual_baseline": evaluate(model, examples(run, cfg.data.eval_split, manual=True), run.cands, bs, pad,
                                    D.device, no_prompt, pipeline, pack_to),
        "prompt_table": str(out / "prompt_table"),
    }
    if D.is_main:
        (out / "eval.json").write_text(json.dumps(res, indent=2) + "\n")
    say(f"eval {cfg.data.eval_split}: p-tuning {_headline(res['ptuning'])} | "
        f"manual template {_headline(res['manual_baseline'])}; table -> {out / 'prompt_table'}")
    D.barrier()
    return res


def _headline(res: dict) -> str:
    if "accuracy" in res:
        return f"acc {res['accuracy']:.3f} macro-F1 {res['macro_f1']:.3f}"
    return f"P@1 {res['p@1_macro']:.3f} (macro over {len(res['p@1_per_relation'])} relations)"
