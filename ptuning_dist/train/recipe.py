"""The training recipe: ``setup()`` in a fixed order, then ``train()``: the same on 1 rank or on
TP x PP x DP ranks. Each stage is a method, so a benchmark or a test observes (or a later feature
changes) one stage by overriding it, not by patching this module.

    setup():  plan the layout (before any process group) -> process groups -> the output directory's
              lock (rank 0, before anything is written; train/lock.py) -> build: tokenizer,
              task, backbone loaded and frozen, encoder (seeded), model -> parallelize: checkpoint
              wrapping -> ZeRO-3 / FSDP2 -> pipeline (``parallel/parallelize.py``), replicas made
              identical, trainable count checked -> optimizer -> resume
    train():  per step ``train_step``, then ``maybe_log / maybe_save / maybe_stop / maybe_eval``;
              at the end ``finish``: export the table, evaluate through it and the manual baseline

One optimizer step, on every rank::

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
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ptuning_dist import debug
from ptuning_dist.config import RunConfig
from ptuning_dist.data.collate import collate
from ptuning_dist.data.packing import pad_packed, step_forwards
from ptuning_dist.data.scoring import longest
from ptuning_dist.data.stream import make_stream
from ptuning_dist.errors import PTuningError
from ptuning_dist.parallel import launch
from ptuning_dist.parallel.parallelize import ParallelPlan, check_megatron_model, parallelize
from ptuning_dist.train import checkpoint as ckpt
from ptuning_dist.train.build import build_model, build_run, examples, resolve_model_path
from ptuning_dist.train.lock import RunLock
from ptuning_dist.train.evaluate import evaluate, export_and_evaluate, headline
from ptuning_dist.train.select import Selection, headline_score
from ptuning_dist.train.stop import StopRequested, StopWatch

_NONE = 2**62  # "no non-finite loss yet"


def lr_lambda(cfg: RunConfig):
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``max_steps`` (or constant)."""
    warm, total = cfg.train.warmup_steps, cfg.train.max_steps
    constant = cfg.train.lr_schedule == "constant"

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 1.0 if constant else max(0.0, (total - step) / max(1, total - warm))

    return f


def train(cfg: RunConfig, log=print) -> dict:
    """Set up, train, evaluate and export; returns the final eval results (on every rank)."""
    return PTuningRecipe(cfg, log).run()


class PTuningRecipe:
    def __init__(self, cfg: RunConfig, log=print):
        self.cfg, self.log = cfg, log

    def run(self) -> dict:
        self.lock = RunLock(Path(self.cfg.train.output_dir))  # rank 0 takes it first thing in setup
        with StopWatch(Path(self.cfg.train.output_dir)) as self.stop:  # SIGUSR1/SIGTERM or <output_dir>/STOP
            try:
                self.setup()
            except PTuningError:  # bad input found while setting up: leave the output directory as it was
                self.lock.abandon()
                raise
            except BaseException:
                self.lock.release()
                raise
            try:
                return self.train()
            finally:
                self.lock.release()

    # ---- set-up, in this order -------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.plan = ParallelPlan.from_config(cfg)  # every layout rule, before any process group
        self.D = D = self.plan.start()
        self.say = self.log if D.is_main else (lambda *a, **k: None)
        self.out = Path(cfg.train.output_dir)
        error = None
        if D.is_main:  # before any rank writes: one run per output directory (train/lock.py)
            try:
                self.lock.acquire(self.say)
                default = self.out / "default_backbone"
                if cfg.model.path is None and not default.exists():
                    self.lock.made(default)
                resolve_model_path(cfg)  # builds the embedded default backbone once, before others read it
                self.stop.clear_stale_file(self.say)
            except PTuningError as e:
                error = e
        launch.agree(D, error)  # every rank raises rank 0's error (else they would wait for it)
        self.build()
        self.parallelize()
        self.build_optimizer()
        self.resume()

    def build(self) -> None:
        """Tokenizer, task, the backbone loaded and frozen (before anything wraps it), the encoder
        (seeded: identical on every rank) and the model. ``encoder`` is None on pipeline stages
        after the first."""
        cfg = self.cfg
        if self.plan.megatron and cfg.model.path is None:  # the embedded default's path is only known now
            check_megatron_model(resolve_model_path(cfg), cfg.parallel.tp, cfg.parallel.pp)
        with self.plan.loading():
            self.parts = build_run(cfg, self.D.device, fill=self.plan.fill(resolve_model_path(cfg)))
        self.train_ex = examples(self.parts, cfg.data.train_split)
        self.eval_ex = examples(self.parts, cfg.data.eval_split)
        test = cfg.data.test_split
        has_test = test is not None and test != cfg.data.eval_split and self.parts.task.has_split(test)
        self.test_ex = examples(self.parts, test) if has_test else None
        self.per_epoch = cfg.resolve_steps(len(self.train_ex))  # max_steps from epochs, now the rows are known
        self.model, self.encoder = build_model(self.parts, cfg.train.seed)

    def parallelize(self) -> None:
        self.par = parallelize(self.model, self.plan, resolve_model_path(self.cfg))
        if self.par.gather_why:
            self.say(self.par.gather_why)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        own = sum(p.numel() for p in self.encoder.parameters()) if self.encoder is not None else 0
        if trainable != own:  # after every wrapper: nothing but the encoder may train
            raise RuntimeError(f"{trainable} trainable parameters after wrapping, the encoder has {own}")
        if self.encoder is not None:
            launch.broadcast_replicas(self.encoder)  # identical replicas from the first step on

    def build_optimizer(self) -> None:
        t, self.opt, self.sched = self.cfg.train, None, None
        if self.encoder is not None:
            self.opt = torch.optim.AdamW(self.encoder.parameters(), lr=t.lr, weight_decay=t.weight_decay)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.cfg))

    def resume(self) -> None:
        cfg, run, D = self.cfg, self.parts, self.D
        self.stream = make_stream(cfg.data.batching, self.train_ex, run.groups.names, cfg.train.seed)
        self.selection = Selection(run.groups, run.task.select_metric)
        self.backbone_id = run.ident
        self.start = ckpt.resume(cfg, self.out, run.ident, self.encoder, self.opt, self.sched, self.stream,
                                 D, self.say, run.groups, self.selection)
        if D.is_main:  # rank 0 is on the first pipeline stage: it holds the encoder
            (self.out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            e, p = self.encoder, cfg.parallel
            self.say(f"backbone {run.model_path} ({cfg.model.dtype}, {cfg.model.backend} backend, tp {p.tp}, "
                     f"pp {p.pp}, ZeRO stage {self.plan.zero_stage}, dp {self.plan.dp}); {len(run.groups.names)} "
                     f"prompt group(s), encoder {e.kind}, M={e.n_prompt} table rows "
                     f"({sum(x.numel() for x in e.parameters()):,} trainable); {len(self.train_ex)} "
                     f"train / {len(self.eval_ex)} {cfg.data.eval_split} examples; accumulation "
                     f"{self.plan.accumulation}; host heap {self.par.heap.mode}")

    # ---- the loop --------------------------------------------------------------------------

    def train(self) -> dict:
        t = self.cfg.train
        self.metrics = _open_metrics(self.out, self.start) if self.D.is_main else None
        self.stats = torch.zeros(2, dtype=torch.float64, device=self.D.device)  # loss sum, tokens since the log
        self.first_bad = torch.full((), _NONE, dtype=torch.long, device=self.D.device)
        self.t_last, self.last_logged = time.perf_counter(), self.start
        self.last_step, self.stopped_early = self.start, False
        self.bar = tqdm(range(self.start + 1, t.max_steps + 1), desc="train", dynamic_ncols=True,
                        disable=not self.D.is_main, initial=self.start, total=t.max_steps, mininterval=1.0)
        for step in self.bar:
            step_loss = self.train_step(step)
            self.stats[0] += step_loss  # zero on pipeline stages before the last
            self.first_bad = torch.where(torch.isfinite(step_loss) | (self.first_bad != _NONE), self.first_bad, step)
            self.maybe_log(step)
            self.maybe_save(step)
            self.maybe_stop(step)
            self.last_step = step
            self.maybe_eval(step)
            if self.stopped_early:
                break
        if self.metrics:
            self.metrics.close()
        with self.hold():
            return self.finish()

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step (module docstring); returns the step's loss as a device tensor."""
        debug.maybe_fail("step", step)
        batches = self.batches(step)
        table_MH = table_leaf = None
        if self.encoder is not None:
            table_MH = self.encoder()
            table_leaf = table_MH.detach().requires_grad_()
        with self.hold():
            step_loss = self.forward_backward(batches, table_leaf)
            self.par.release()
        self.stats[1] += sum(b.n_tokens for b in batches)
        if self.encoder is not None:
            grad_MH = table_leaf.grad
            if self.par.dp > 1:  # over DP only: TP replicas already hold the same table gradient
                dist.all_reduce(grad_MH, group=self.par.dp_group)
                grad_MH /= self.par.dp
            table_MH.backward(grad_MH)
        self.optimizer_step(step)
        self.par.heap.after_step()  # CPU, host_malloc trim: return the heap pages ZeRO-3's gathers fragmented
        return step_loss

    def batches(self, step: int) -> list:
        """This rank's forwards of the step: the global batch from the sample stream, this DP rank's
        contiguous share (TP replicas and pipeline stages share it), cut into forwards."""
        t, par = self.cfg.train, self.par
        per_rank = t.global_batch_size // par.dp
        idx = self.stream.take(t.global_batch_size)
        self.present = {self.train_ex[j].pgroup for j in idx}  # host ints: the prompt groups this step trains
        rows_by_rank = [[self.train_ex[j] for j in idx[r * per_rank : (r + 1) * per_rank]] for r in range(par.dp)]
        rows = rows_by_rank[par.dp_rank]
        pack_to = self.pack_to
        if pack_to is not None:  # packed forwards, each within a padded micro-batch's positions
            groups = step_forwards(rows_by_rank, par.dp_rank, t.micro_batch_size, pack_to)
            batches = [self.collate(g, None) for g in groups]
            if par.pipeline is not None:  # one activation shape per step: the largest forward's (host ints)
                B, T = (max(b.ids_BS.shape[d] for b in batches) for d in (0, 1))
                batches = [pad_packed(b, B, T, self.parts.tok.pad_id) for b in batches]
        else:
            # a pipeline sends one activation shape per step: pad to the step's longest row (a host int)
            seq_len = max(longest(e) for e in rows) if par.pipeline is not None else None
            batches = [self.collate(rows[i : i + t.micro_batch_size], seq_len)
                       for i in range(0, per_rank, t.micro_batch_size)]
        return [b.to(self.D.device) for b in batches]

    def collate(self, rows: list, seq_len: int | None):
        return collate(rows, self.parts.tok.pad_id, seq_len, self.pack_to)

    @property
    def pack_to(self) -> int | None:
        return self.cfg.pack_to

    def hold(self):
        """The context a step's (and an evaluation's) forwards run in (``Parallelized.hold``)."""
        return self.par.hold()

    def forward_backward(self, batches: list, table_leaf) -> torch.Tensor:
        """Every forward's summed loss / the step's rows backpropagates into ``table_leaf.grad``
        (forwards may hold different numbers of rows: packed ones are filled by size)."""
        if self.par.pipeline is not None:
            return self.par.pipeline.train_step(batches, table_leaf)
        step_loss = torch.zeros((), device=batches[0].ids_BS.device)
        rows = sum(len(b.label_E) for b in batches)
        for batch in batches:
            loss = self.model.loss(batch, table_leaf, reduction="sum") / rows
            loss.backward()
            step_loss += loss.detach()
        return step_loss

    def optimizer_step(self, step: int) -> None:
        """Clip each prompt group's gradient on its own and update the encoders (gradients are final
        here). A group with no rows in the step gets None gradients: AdamW skips such parameters, so
        its weights, moments and step count stay bit for bit as they were (weight decay included)."""
        if self.encoder is None:
            return
        clip = self.cfg.train.max_grad_norm
        for g in range(len(self.encoder.encoders)):
            params = self.encoder.group_parameters(g)
            if g not in self.present:
                for p in params:
                    p.grad = None
            elif clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    # ---- what happens between steps -------------------------------------------------------------

    def is_save_step(self, step: int) -> bool:
        t = self.cfg.train
        return bool(t.save_every and step % t.save_every == 0) or step == t.max_steps

    def is_log_step(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or self.is_save_step(step)

    def maybe_log(self, step: int) -> None:
        if not self.is_log_step(step):
            return
        D, par = self.D, self.par
        _check_finite(self.first_bad, D)  # host sync: log and save steps only
        if par.pipeline is not None:  # the loss lives on the last stage
            dist.all_reduce(self.stats[:1], group=par.pipeline.group)
        if par.dp > 1:
            dist.all_reduce(self.stats, group=par.dp_group)
        loss_sum, tokens = self.stats.tolist()  # host sync: log steps only
        now = time.perf_counter()
        rec = {"step": step, "loss": loss_sum / par.dp / (step - self.last_logged),
               "lr": self.sched.get_last_lr()[0] if self.sched else None, "samples": self.stream.consumed,
               "tokens_per_s": tokens / (now - self.t_last)}
        if D.is_main:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}")
        self.stats.zero_()
        self.t_last, self.last_logged = now, step

    def save(self, step: int) -> None:
        ckpt.save_step(self.out, step, self.cfg, self.encoder, self.opt, self.sched, self.stream, self.backbone_id,
                       self.D, self.parts.groups, self.selection)

    def maybe_save(self, step: int) -> None:
        if self.is_save_step(step):
            self.save(step)

    def maybe_stop(self, step: int) -> None:
        """A stop request (agreed by all ranks on log steps): checkpoint this step, then leave."""
        if not self.is_log_step(step) or step >= self.cfg.train.max_steps or not self.stop.agreed(self.D):
            return
        if not self.is_save_step(step):  # a preempted job loses nothing
            self.save(step)
        if self.metrics:
            self.metrics.close()
        if self.D.is_main:
            self.stop.mark_stopped(step)
        raise StopRequested(step, self.stop.reason)

    def is_eval_step(self, step: int) -> bool:
        """Evaluations during training (the last step's included: it is a candidate for selection)."""
        t = self.cfg.train
        return bool(t.eval_every and step % t.eval_every == 0) or (t.eval_every_epoch and step % self.per_epoch == 0) \
            or (step == t.max_steps and bool(t.eval_every or t.eval_every_epoch))

    def maybe_eval(self, step: int) -> None:
        """Evaluate on the eval split, record the dev curve and each group's best; early stopping."""
        t = self.cfg.train
        if not self.is_eval_step(step):
            return
        with self.hold():
            res = evaluate(self.model, self.eval_ex, self.parts.cands, t.eval_batch_size, self.parts.tok.pad_id,
                           self.D.device, pipeline=self.par.pipeline, pack_to=self.pack_to)
        improved = self.selection.update(step, res, self.encoder if t.select_best else None)
        if self.metrics:  # the dev curve (every rank has the results: predictions are gathered)
            self.metrics.write(json.dumps({"step": step, "eval_split": self.cfg.data.eval_split,
                                           "score": headline_score(res, self.parts.task.select_metric),
                                           "group_scores": self.selection.scores(res), "improved": improved}) + "\n")
            self.metrics.flush()
        self.say(f"step {step} eval {self.cfg.data.eval_split}: {headline(res)}")
        if t.patience and self.selection.stale >= t.patience and step < t.max_steps:
            self.say(f"early stop at step {step}: no prompt group improved on {self.cfg.data.eval_split} in "
                     f"{t.patience} evaluations")
            if not self.is_save_step(step):  # --resume finds the stopped run's state
                self.save(step)
            self.stopped_early = True

    def finish(self) -> dict:
        """Put each group's best weights back (train.select_best, after evaluations during
        training), export the table, then evaluate through it (what inference uses) and the manual
        baseline on the eval and test splits."""
        if self.cfg.train.select_best:
            self.selection.restore(self.encoder)
        return export_and_evaluate(self.model, self.encoder, self.parts, self.eval_ex, self.test_ex, self.out,
                                   self.D, self.par.pipeline, self.pack_to, self.say, self.last_step, self.selection)


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
