"""Workers of benchmarks/vs_peft.py: each call is one process (or one rank) doing one thing.

    python benchmarks/vs_peft_workers.py ours --record DIR [--steps N --profile_step K] <train.py flags>
    python benchmarks/vs_peft_workers.py peft --record DIR [...] <train.py flags>
    deepspeed --num_gpus 2 benchmarks/vs_peft_workers.py {ours,peft} ... --ds_config ds_configs/zero3.json
    python benchmarks/vs_peft_workers.py matmul --threads 2 --rows 512
    python benchmarks/vs_peft_workers.py fairness --model DIR --record FILE

Both systems read the same run config (``ptuning_dist.cli.train.parse`` over train.py's flags), so they get
the same backbone, rows, sample order, global and micro batch, lr schedule, clipping and prompt
length. ``ours`` is the training recipe itself (``ptuning_dist.train.recipe``), observed by
overriding four of its stages (collate, hold, parallelize, optimizer_step);
``peft`` is Hugging Face PEFT's ``P_TUNING`` (``PromptEncoder`` with
``encoder_reparameterization_type="LSTM"``) on ``AutoModelForCausalLM``: one process with a torch
AdamW loop (the same optimizer as ours, unfused: the HF Trainer would pick torch's fused AdamW,
which would speed both alike; the optimizer is ~3% of a step), or under DeepSpeed ZeRO-3 the way the
``Trainer`` integration runs it: ``HfDeepSpeedConfig`` before ``from_pretrained`` (partitioned while
loading), ``get_peft_model``, then ``deepspeed.initialize(model=peft_model, optimizer=AdamW)``:
one engine over the whole model, prompt encoder included.

Each rank writes ``DIR/<system>.rank<r>.json``: per-step times and losses, trained tokens, peak
memory, and (``--profile_step K``) a torch.profiler breakdown of step K by category.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# --------------------------------------------------------------------------------------------
# memory


def vm_hwm() -> int:
    """Peak resident set of this process since start (or since ``reset_hwm``), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (not ru_maxrss) to the current RSS
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# profiling: label modules with record_function ranges, attribute backward ops to the label of
# the forward op that created their autograd node (same sequence number), group self times

COMM = re.compile(r"all_gather|allgather|all_reduce|allreduce|reduce_scatter|broadcast|gloo|c10d::|barrier"
                  r"|record_param_comms|wait", re.I)
OPTIM = ("Optimizer.step", "Optimizer.zero_grad", "L:optimizer")
CATEGORY = {  # label -> the table's category
    "encoder": "prompt encoder (LSTM+MLP)", "splice": "splice / embedding lookup + concat",
    "attn proj": "attention: QKV and output projections", "attn core": "attention: scores, softmax, values",
    "mlp": "MLP (two GEMMs + GELU)", "layernorm": "layernorms", "block": "residual adds (block glue)",
    "glue": "backbone glue (masks, target gather)", "head": "head + loss", "optimizer": "optimizer (clip, AdamW)",
    "communication": "communication (gloo collectives, waits)", "zero3": "ZeRO-3 hooks, fetch/release (Python)",
    "zero3 ops": "ZeRO-3 fetch/release tensor ops (cat of partitions, frees)",
    "data": "data (collate)", "other": "other (unlabelled ops)",
}


class Labels:
    """record_function ranges around modules (forward pre/post hooks) and methods."""

    def __init__(self):
        self.handles = []

    def module(self, mod, label):
        stack = []

        def pre(m, args):
            rf = torch.autograd.profiler.record_function("L:" + label)
            rf.__enter__()
            stack.append(rf)

        def post(m, args, out):
            stack.pop().__exit__(None, None, None)

        self.handles.append(mod.register_forward_pre_hook(pre))
        self.handles.append(mod.register_forward_hook(post, prepend=True))  # before ZeRO-3's release hook

    @staticmethod
    def method(obj, name, label, cls=False):
        fn = getattr(obj, name)

        def wrapped(*a, **k):
            with torch.autograd.profiler.record_function("L:" + label):
                return fn(*a, **k)
        setattr(obj, name, wrapped)

    def gpt2(self, lm):
        """GPT2LMHeadModel: blocks, attention (projections vs core), MLP, norms, embeddings."""
        tr = lm.transformer
        self.module(tr, "glue")
        self.module(tr.wte, "splice")
        self.module(tr.wpe, "splice")
        self.module(tr.ln_f, "layernorm")
        for blk in tr.h:
            self.module(blk, "block")
            self.module(blk.attn, "attn core")
            self.module(blk.attn.c_attn, "attn proj")
            self.module(blk.attn.c_proj, "attn proj")
            self.module(blk.mlp, "mlp")
            self.module(blk.ln_1, "layernorm")
            self.module(blk.ln_2, "layernorm")


def label_zero3():
    """ZeRO-3's module hooks and per-module fetch and release: Python bookkeeping and the tensor
    ops it runs (assembling gathered partitions with ``torch.cat``, freeing); waiting on a
    gather's collective is communication."""
    from deepspeed.runtime.zero import partition_parameters as pp
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload as O
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C

    for cls, names in ((C, ("fetch_sub_module", "release_sub_module", "release_and_reset_all")),
                       (O, ("pre_sub_module_forward_function", "post_sub_module_forward_function",
                            "pre_sub_module_backward_function", "post_sub_module_backward_function"))):
        for name in names:
            if hasattr(cls, name):
                Labels.method(cls, name, "zero3")
    instrument = pp.instrument_w_nvtx

    def labelled(fn):  # DeepSpeed wraps each handle's wait() in this at call time
        if getattr(fn, "__name__", "") != "wait":
            return instrument(fn)

        def waiting(*a, **k):
            with torch.autograd.profiler.record_function("L:communication"):
                return fn(*a, **k)
        return waiting
    pp.instrument_w_nvtx = labelled


def label_collectives():
    """Blocking collectives called from Python (the loop's table-gradient and loss all-reduces,
    DeepSpeed's): their wait for the other rank happens outside any op, so label the calls."""
    import torch.distributed as dist

    for name in ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        Labels.method(dist, name, "communication")


def categorize(prof, wall_s: float) -> dict:
    """Seconds per (category, direction) for one profiled step, from the events' self times."""
    events = prof.events()
    fwd_label = {}
    out = {}

    ops = {}

    def add(label, direction, us, name):
        key = f"{CATEGORY.get(label, label)}|{direction}"
        out[key] = out.get(key, 0.0) + us / 1e6
        op = f"{CATEGORY.get(label, label)}|{name}"
        ops[op] = ops.get(op, 0.0) + us / 1e6

    def visit(e, label, direction):
        name = e.name
        if name.startswith("autograd::engine::evaluate_function"):
            direction = "backward"
            label = fwd_label.get(e.sequence_nr, label if label != "other" else "other")
        if name.startswith(OPTIM) or name.startswith("Optimizer."):
            label = "optimizer"
        elif name.startswith("L:"):
            label = name[2:]
        elif label == "zero3" and name.startswith("aten::"):
            label = "zero3 ops"
        elif COMM.search(name) and not name.startswith("autograd::"):
            label = "communication"
        if direction == "forward" and e.sequence_nr >= 0:
            fwd_label.setdefault(e.sequence_nr, label)
        add(label, direction, e.self_cpu_time_total, name)
        for c in sorted(e.cpu_children, key=lambda c: c.time_range.start):
            visit(c, label, direction)

    main = {}
    for e in events:
        main[e.thread] = main.get(e.thread, 0) + 1
    thread = max(main, key=main.get)  # the training thread (CPU backward runs on it too)
    roots = sorted((e for e in events if e.cpu_parent is None and e.thread == thread), key=lambda e: e.time_range.start)
    for r in roots:
        visit(r, "other", "forward")
    profiled = sum(out.values())
    out["unprofiled (Python between ops, autograd engine)|-"] = max(0.0, wall_s - profiled)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:25]
    return {"wall_s": wall_s, "seconds": out, "top_ops": dict(top)}


class _Profiler:
    """torch.profiler over one step (``--cprofile``: Python's cProfile instead, a diagnostic that
    writes ``DIR/<system>.rank<r>.pstats`` and ranks Python functions by their own time)."""

    def __init__(self, args):
        self.args = args
        if args.cprofile:
            import cProfile

            self.p = cProfile.Profile()
            self.p.enable()
        else:
            self.p = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.p.start()

    def stop(self, wall_s: float) -> dict:
        if self.args.cprofile:
            self.p.disable()
            import pstats

            path = Path(self.args.record) / f"rank{os.environ.get('RANK', 0)}.pstats"
            Path(self.args.record).mkdir(parents=True, exist_ok=True)
            self.p.dump_stats(path)
            st = pstats.Stats(str(path))
            top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:30]  # by own time
            return {"wall_s": wall_s, "seconds": {}, "top_python": {f"{k[0]}:{k[1]}:{k[2]}": v[2] for k, v in top}}
        self.p.stop()
        return categorize(self.p, wall_s)


def profile_ours_setup(model, encoder):
    lab = Labels()
    if encoder is not None:
        lab.module(encoder, "encoder")
    lab.method(model.backbone, "splice", "splice")
    lab.method(model.backbone, "reference_splice", "splice")
    lab.method(model.backbone, "head", "head")
    lab.method(model, "loss", "head")
    if hasattr(model.backbone.model, "transformer"):  # hf GPT-2's blocks labelled; megatron's ops by name only
        lab.gpt2(model.backbone.model)
    clip = torch.nn.utils.clip_grad_norm_

    def clip_labelled(*a, **k):
        with torch.autograd.profiler.record_function("L:optimizer"):
            return clip(*a, **k)
    torch.nn.utils.clip_grad_norm_ = clip_labelled
    return lab


# --------------------------------------------------------------------------------------------
# the shared workload description


def record_path(args, system: str) -> Path:
    return Path(args.record) / f"{system}.rank{os.environ.get('RANK', 0)}.json"


def new_record(args, system) -> dict:
    return {"system": system, "rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
            "threads": torch.get_num_threads(), "step_times": [], "losses": [], "tokens": [], "padded_tokens": [],
            "t_start": time.perf_counter()}


def finish_record(args, rec: dict) -> None:
    rec["peak_rss_bytes"] = rec.get("peak_rss_bytes") or vm_hwm()
    Path(args.record).mkdir(parents=True, exist_ok=True)
    record_path(args, rec["system"]).write_text(json.dumps(rec))


def lama_like_rows(cfg):
    """Tokenizer, template and encoded training examples exactly as our loop builds them."""
    from ptuning_dist.data.collate import build_candidates, encode_rows
    from ptuning_dist.data.tasks import build_task
    from ptuning_dist.data.tokenizer import PieceTokenizer
    from ptuning_dist.prompt.template import Template

    tok = PieceTokenizer.from_dir(cfg.model.path)
    task = build_task(cfg.data.task, cfg.data.data_dir, cfg.data.relations)
    template = Template(cfg.prompt.template or task.default_template, fields=task.fields)
    cands = build_candidates(task, tok, cfg.data.allowed_vocab, template.parts[-1].space_before)
    ex = encode_rows(task.rows(cfg.data.train_split), lambda r: template, tok, cfg.data.max_seq_len, cands)
    m = template.n_prompt
    for e in ex:  # PEFT's P_TUNING is prefix-only: the template must put every slot first
        assert e.enc.prompt_pos == tuple(range(m)) and e.enc.prompt_slot == tuple(range(m)), \
            f"template {template.text!r} is not a prefix template (PEFT prepends the prompt)"
    return tok, template, ex


def peft_batch(examples, m: int, pad_id: int) -> dict:
    """The same rows as PEFT's causal-LM input: the tokens after the prompt, then the target;
    labels -100 except at the target (the HF loss shifts them: predicted from the position
    before it, which is our target position). Right padding, like our collator."""
    seqs = [list(e.enc.ids[m:]) + [e.enc.target_id] for e in examples]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
        labels[b, len(s) - 1] = s[-1]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def copy_encoder_into_peft(ours, peft_encoder) -> None:
    """Our PromptEncoder('lstm') and PEFT's LSTM PromptEncoder (encoder_hidden_size = h/2, 2
    layers) have the same parameters under other names: start both from the same weights."""
    sd = {k.replace("lstm.", "lstm_head.").replace("mlp.", "mlp_head."): v for k, v in ours.state_dict().items()}
    missing, unexpected = peft_encoder.load_state_dict(sd, strict=True)
    assert not missing and not unexpected


def our_initial_encoder(seed: int, m: int, h: int):
    from ptuning_dist.prompt.encoder import PromptEncoder

    torch.manual_seed(seed)  # what train/build.py:build_model does
    return PromptEncoder("lstm", m, h)


def build_peft_model(path, m: int, seed: int):
    from peft import PromptEncoderConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    h = base.get_input_embeddings().embedding_dim
    pc = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m, encoder_reparameterization_type="LSTM",
                             encoder_hidden_size=h // 2, encoder_num_layers=2, encoder_dropout=0.0)
    pm = get_peft_model(base, pc)
    copy_encoder_into_peft(our_initial_encoder(seed, m, h), pm.prompt_encoder["default"])
    return pm


def peft_ds_config(cfg, world: int) -> dict:
    """The project's ZeRO-3 JSON with the "auto" fields filled the way the HF Trainer fills them."""
    ds = json.loads(Path(cfg.parallel.ds_config).read_text())
    micro, G = cfg.train.micro_batch_size, cfg.train.global_batch_size
    fill = {"train_batch_size": G, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": G // (micro * world), "gradient_clipping": cfg.train.max_grad_norm}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    return ds


# --------------------------------------------------------------------------------------------
# systems


class _Done(Exception):
    pass


def run_ours(args, cfg) -> None:
    from common import observed_recipe

    from ptuning_dist.cli.common import quiet_libraries

    quiet_libraries()
    rec = new_record(args, "ours")
    cfg.train.max_steps = args.steps + 1  # the hook stops the run after step N+1's backward: N full periods
    state = {"last": None, "prof": None, "lab": None, "step_tokens": [0, 0]}

    class Hooks:
        def after_setup(self, model, encoder, engine):
            rec["setup_s"] = time.perf_counter() - rec["t_start"]
            rec["peak_rss_setup_bytes"] = vm_hwm()
            rec["hwm_reset"] = reset_hwm()
            if args.profile_step:
                state["lab"] = profile_ours_setup(model, encoder)
                if engine is not None:
                    label_zero3()
                    if hasattr(engine.optimizer, "release_backward_leftovers"):
                        Labels.method(engine.optimizer, "release_backward_leftovers", "zero3")
                if torch.distributed.is_initialized():
                    label_collectives()
            state["last"] = time.perf_counter()

        def after_backward(self, step, encoder):
            now = time.perf_counter()
            if 1 < step <= args.steps:  # period k = optimizer step k-1, then step k's data, forward, backward:
                # steps 2..N, the rows PEFT's timed steps 2..N see (step N+1 only runs optimizer step N)
                rec["step_times"].append(now - state["last"])
                rec["tokens"].append(state["step_tokens"][0])
                rec["padded_tokens"].append(state["step_tokens"][1])
            state["step_tokens"] = [0, 0]
            # the profiled period: the optimizer step of step K-1, then step K's data, forward and
            # backward (PEFT's profiled step K: the same rows, then its optimizer step)
            if args.profile_step and step == args.profile_step - 1:
                state["prof"] = _Profiler(args)
                now = time.perf_counter()
            elif args.profile_step and step == args.profile_step:
                rec["profile"] = state["prof"].stop(now - state["last"])
            if step == args.steps + 1:
                rec["peak_rss_bytes"] = vm_hwm() if not rec["hwm_reset"] else None
                rec["peak_rss_train_bytes"] = vm_hwm()
                rec["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                raise _Done()
            state["last"] = time.perf_counter()

    hooks = Hooks()

    class Observed(observed_recipe(hooks)):
        """The recipe as shipped, observed at four of its stages (after set-up, the optimizer step and,
        here, each forward's collation and the step's hold)."""

        def collate(self, rows, seq_len):  # trained tokens (prompt included) and padded positions per step
            with torch.autograd.profiler.record_function("L:data"):
                b = super().collate(rows, seq_len)
            state["step_tokens"][0] += b.n_tokens
            state["step_tokens"][1] += b.ids_BS.numel()
            return b

        @contextlib.contextmanager
        def hold(self):  # ZeRO-3: the step's gather of the embedding and head, entered and left
            cm = super().hold()
            if not args.profile_step:
                with cm:
                    yield
                return
            # entering gathers the embedding table and head (a synchronous all-gather: cProfile puts
            # nearly all of it in c10d's wait); leaving re-partitions them
            with torch.autograd.profiler.record_function("L:communication"):
                cm.__enter__()
            try:
                yield
            finally:
                with torch.autograd.profiler.record_function("L:zero3"):
                    cm.__exit__(None, None, None)

    try:
        Observed(cfg, log=lambda *a, **k: None).run()
    except _Done:
        pass
    metrics = Path(cfg.train.output_dir) / "metrics.jsonl"
    if metrics.is_file():
        rec["losses"] = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line]
    # ru_maxrss cannot be reset: with VmHWM reset after set-up, the whole-run peak is the larger of
    # the set-up peak and the training peak
    rec["peak_rss_bytes"] = rec["peak_rss_bytes"] or max(rec["peak_rss_setup_bytes"], rec["peak_rss_train_bytes"])
    finish_record(args, rec)


def run_peft(args, cfg) -> None:
    from ptuning_dist.cli.common import quiet_libraries
    from ptuning_dist.data.collate import SampleStream
    from ptuning_dist.train.recipe import lr_lambda

    quiet_libraries()
    rec = new_record(args, "peft")
    cfg.train.max_steps = args.steps + 1  # the same lr schedule as ours (run_ours)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    ds = None
    if cfg.parallel.ds_config:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        from ptuning_dist.compat.deepspeed_shm import unlink_deepspeed_shm

        deepspeed.init_distributed(dist_backend="gloo")
        unlink_deepspeed_shm()  # not a PEFT cost: DeepSpeed's CPU comm op would leave 66 MiB per rank in /dev/shm
        ds = peft_ds_config(cfg, world)
        keep = HfDeepSpeedConfig(ds)  # noqa: F841 - kept alive: from_pretrained partitions while loading (zero.Init)
    tok, template, examples = lama_like_rows(cfg)
    m = template.n_prompt
    pm = build_peft_model(cfg.model.path, m, cfg.train.seed)
    pm.train()
    trainable = [p for p in pm.parameters() if p.requires_grad]
    rec["trainable"] = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    G, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_rank = G // world
    accum = per_rank // micro
    if ds is not None:
        import deepspeed

        engine, opt, _, sched = deepspeed.initialize(
            model=pm, optimizer=opt, config=ds,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg)))
        rec["encoder_partitioned"] = any(getattr(p, "ds_numel", p.numel()) != p.numel()
                                         for p in pm.prompt_encoder.parameters())
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    stream = SampleStream(len(examples), cfg.train.seed)
    rec["setup_s"] = time.perf_counter() - rec["t_start"]
    rec["peak_rss_setup_bytes"] = vm_hwm()
    rec["hwm_reset"] = reset_hwm()

    prof = None
    if args.profile_step:
        lab = Labels()
        lab.module(pm.prompt_encoder["default"], "encoder")  # get_prompt calls the adapter's encoder, not the dict
        lab.module(pm, "splice")  # PeftModel.forward itself: word-embedding lookup, concat of prompt and input
        lab.module(pm.get_base_model(), "head")  # the LM head module and HF's loss
        lab.gpt2(pm.get_base_model())
        if ds is not None:
            label_zero3()
            label_collectives()
    label = lambda name: torch.autograd.profiler.record_function("L:" + name)  # noqa: E731

    for step in range(1, args.steps + 1):
        if args.profile_step and step == args.profile_step:
            prof = _Profiler(args)
        t0 = time.perf_counter()
        with label("data"):
            rows = [examples[j] for j in stream.take(G)[rank * per_rank:(rank + 1) * per_rank]]
            batches = [peft_batch(rows[i:i + micro], m, tok.pad_id) for i in range(0, per_rank, micro)]
        n_tok = sum(len(e.enc.ids) for e in rows)  # the same count as ours: prompt + input, no target
        loss_sum = torch.zeros(())
        for b in batches:
            if ds is not None:
                out = engine(**b)
                engine.backward(out.loss)  # DeepSpeed scales by 1/accumulation itself
                with label("optimizer"):
                    engine.step()  # steps the optimizer at the accumulation boundary
            else:
                out = pm(**b)
                (out.loss / accum).backward()
            loss_sum += out.loss.detach() / accum
        if ds is None:
            with label("optimizer"):
                torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= world
        rec["losses"].append(loss_sum.item())
        now = time.perf_counter()
        if step > 1:  # steps 2..N (ours: periods 2..N, the same rows): the first step is set-up-like everywhere
            rec["step_times"].append(now - t0)
            rec["tokens"].append(n_tok)
            rec["padded_tokens"].append(sum(b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1 + m) for b in batches))
        if prof is not None and step == args.profile_step:
            rec["profile"] = prof.stop(now - t0)
            prof = None
    rec["peak_rss_train_bytes"] = vm_hwm()
    rec["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rec["peak_rss_bytes"] = max(rec["peak_rss_setup_bytes"], rec["peak_rss_train_bytes"]) if rec["hwm_reset"] \
        else rec["peak_rss_train_bytes"]
    finish_record(args, rec)


# --------------------------------------------------------------------------------------------
# the machine's matmul rate, and the fairness check


def matmul_rate(threads: int, rows: int, h: int = 768, seconds: float = 0.4) -> dict:
    """GFLOP/s of fp32 torch.mm at the backbone's GEMM shapes (rows x h x 3h, h x h, h x 4h, 4h x h)
    with ``rows`` token rows, and of a large 2048 x 768 x 3072 GEMM (the machine's best), medians."""
    torch.set_num_threads(threads)
    out = {}
    shapes = {"backbone": [(rows, h, 3 * h), (rows, h, h), (rows, h, 4 * h), (rows, 4 * h, h)],
              "large": [(2048, h, 4 * h)]}
    for name, group in shapes.items():
        rates = []
        for (M, K, N) in group:
            a, b = torch.randn(M, K), torch.randn(K, N)
            for _ in range(3):
                torch.mm(a, b)
            t_end = time.perf_counter() + seconds
            ts = []
            while time.perf_counter() < t_end or len(ts) < 5:
                t = time.perf_counter()
                torch.mm(a, b)
                ts.append(time.perf_counter() - t)
            ts.sort()
            rates.append(2 * M * K * N / ts[len(ts) // 2] / 1e9)
        # the backbone mix weighted by FLOPs: time-weighted harmonic mean
        flops = [2 * M * K * N for (M, K, N) in group]
        out[name] = sum(flops) / sum(f / (r * 1e9) for f, r in zip(flops, rates)) / 1e9
    return out


def fairness(model_dir: str, cfg_argv: list[str]) -> dict:
    """Same backbone weights, same rows, the same m x h prompt table as a prefix: PEFT's causal-LM
    loss (prompt encoder replaced by the table) against ours (``PromptTable`` through
    ``PTuningModel.loss`` with the head over the full vocabulary, labels = target ids). Then the
    real encoders from the same weights: the tables and the losses."""
    import torch.nn.functional as F

    from ptuning_dist.backbone.hf import HFBackbone
    from ptuning_dist.cli.common import quiet_libraries
    from ptuning_dist.cli.train import parse
    from ptuning_dist.data.collate import Example, collate
    from ptuning_dist.model import PTuningModel
    from ptuning_dist.prompt.encoder import PromptTable

    quiet_libraries()
    cfg = parse(cfg_argv)
    tok, template, ex = lama_like_rows(cfg)
    m = template.n_prompt
    rows = ex[: cfg.train.micro_batch_size]
    rows = [Example(e.enc, e.enc.target_id, e.group) for e in rows]  # labels = vocabulary ids: full-vocab CE
    ours_enc = our_initial_encoder(cfg.train.seed, m, HFBackbone.from_pretrained(model_dir).hidden_size)
    table = ours_enc().detach()

    backbone = HFBackbone.from_pretrained(model_dir)
    padded = collate(rows, tok.pad_id)
    batch = collate(rows, tok.pad_id, pack_to=cfg.pack_to)  # the layout the trainer uses (packed on hf)
    ours = PTuningModel(backbone, PromptTable(table), None, cfg.model.splice)
    with torch.no_grad():
        loss_ours = ours.loss(batch).item()
        loss_ours_padded = ours.loss(padded).item()
        loss_ours_ref = F.cross_entropy(PTuningModel(backbone, PromptTable(table), None, "reference").logits(batch),
                                        batch.label_E).item()

    pm = build_peft_model(model_dir, m, cfg.train.seed)
    pm.eval()
    pb = peft_batch(rows, m, tok.pad_id)
    with torch.no_grad():
        peft_table = pm.prompt_encoder["default"](pm.prompt_tokens["default"].unsqueeze(0))[0]
        loss_peft_encoder = pm(**pb).loss.item()
        enc = pm.prompt_encoder["default"]
        enc.forward = lambda idx: table.unsqueeze(0).expand(idx.shape[0], -1, -1)
        loss_peft = pm(**pb).loss.item()
        loss_ours_encoder = PTuningModel(backbone, ours_enc, None, cfg.model.splice).loss(batch).item()
    return {"rows": len(rows), "m": m, "seq_len": int(padded.ids_BS.shape[1]),
            "packed_shape": list(batch.ids_BS.shape), "loss_ours_padded": loss_ours_padded,
            "loss_ours": loss_ours, "loss_ours_reference_splice": loss_ours_ref, "loss_peft": loss_peft,
            "abs_diff": abs(loss_ours - loss_peft),
            "encoder_table_max_abs_diff": (peft_table - table).abs().max().item(),
            "loss_ours_encoder": loss_ours_encoder, "loss_peft_encoder": loss_peft_encoder,
            "encoder_abs_diff": abs(loss_ours_encoder - loss_peft_encoder)}


# --------------------------------------------------------------------------------------------


def main() -> None:
    argv = sys.argv[1:]
    system = next(a for a in argv if a in ("ours", "peft", "matmul", "fairness"))
    argv.remove(system)  # the deepspeed launcher puts --local_rank=N first
    p = argparse.ArgumentParser()
    p.add_argument("--record")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile_step", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cprofile", action="store_true", help="profile the step with cProfile (diagnostic)")
    args, rest = p.parse_known_args(argv)
    if system == "matmul":
        print(json.dumps(matmul_rate(args.threads, args.rows)))
        return
    if system == "fairness":
        res = fairness(rest[rest.index("--model") + 1], rest)
        Path(args.record).write_text(json.dumps(res))
        return
    from ptuning_dist.cli.train import parse

    cfg = parse(rest)
    {"ours": run_ours, "peft": run_peft}[system](args, cfg)


if __name__ == "__main__":
    main()
