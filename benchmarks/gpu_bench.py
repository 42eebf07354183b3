"""The short GPU benchmark of benchmarks/gpu_check.sh (issue 18): one run, a few minutes on one GPU.

    python benchmarks/gpu_bench.py --out DIR                       # CUDA: the ~1B model (TinyLlama's shape)
    python benchmarks/gpu_bench.py --out DIR --device cpu --tiny   # its code paths on a CPU, in seconds

What it measures, in one process per system (each its own CUDA context and peak counters):

1. the bf16 matmul rate of this device (torch.mm at the model's GEMM shapes and one large GEMM,
   CUDA events, medians): the denominator of MFU, measured in the same run;
2. the splice: ``ptuning::splice`` (Triton on CUDA, the C++ kernel on a CPU) against its pure-torch
   reference backend and the paper's lookup-then-insert oracle, forward and forward+backward, at the
   model's width (8 rows of 512 tokens, a 6-token prompt prefix each);
3. the RTE job (FewGLUE RTE from --data_dir; without one a synthetic RTE-shaped set) on a
   LLaMA-shaped model with random weights in bf16 (22 x 2048, 32 heads in 4 groups, SwiGLU 5632,
   32000-word vocabulary: 1.1B parameters, built here on the device), a 6-token prefix prompt
   ``[P*6] {premise} Question: {hypothesis} ? Answer: [MASK]`` and the LSTM encoder (fp32), through
   ours (the training recipe as shipped: packed forwards, the head at the verbalizer's words) and
   through PEFT's ``P_TUNING`` (LSTM reparameterisation, the same initial encoder weights, the causal-LM
   loss over the vocabulary, a plain AdamW loop): tokens/s, MFU and peak memory
   (``torch.cuda.max_memory_allocated``) each. The first two steps are left out of the rates.

MFU counts 4N FLOPs per trained token (the frozen backbone's forward and input-gradient backward,
N its non-embedding parameters; benchmarks/vs_peft.py's convention) against the matmul rate of (1).
Writes DIR/gpu_bench.json (every number) and DIR/gpu_bench.md (the table), plus each worker's log and
record; the model and the runs' folders go to --work (default $TMPDIR/ptuning_gpu_bench), not DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

M = 6
TEMPLATE = f"[P*{M}] {{premise}} Question: {{hypothesis}} ? Answer: [MASK]"
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
           num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, vocab_size=2048)


# --------------------------------------------------------------------------------------------
# timing


def timer(device):
    """(start, stop) -> seconds; CUDA events on a GPU (no host sync inside the timed region)."""
    import torch

    if device.type == "cuda":
        def run(fn, n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(n):
                fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3 / n
    else:
        def run(fn, n):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t) / n
    return run


def median_time(fn, device, n: int, repeats: int = 5, warmup: int = 2) -> float:
    run = timer(device)
    for _ in range(warmup):
        fn()
    return statistics.median(run(fn, n) for _ in range(repeats))


# --------------------------------------------------------------------------------------------
# 1. the matmul rate


def matmul_rate(device, dtype, shape: dict, rows: int, tiny: bool) -> dict:
    """TFLOP/s of torch.mm in ``dtype``: the model's GEMMs with ``rows`` token rows (QKV, output,
    gate+up, down; a FLOP-weighted harmonic mean) and one large square GEMM (the device's best)."""
    import torch

    h, f = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    big = 256 if tiny else 8192
    groups = {"model_gemms": [(rows, h, h + 2 * kv), (rows, h, h), (rows, h, 2 * f), (rows, f, h)],
              "large": [(big, big, big)]}
    out = {}
    for name, gemms in groups.items():
        flops, secs = 0, 0.0
        for m, k, n in gemms:
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            t = median_time(lambda: torch.mm(a, b), device, n=3 if tiny else 20)
            flops, secs = flops + 2 * m * k * n, secs + t
        out[name] = flops / secs / 1e12
    out["dtype"] = str(dtype).replace("torch.", "")
    return out


# --------------------------------------------------------------------------------------------
# 2. the splice


def splice_bench(device, dtype, shape: dict, tiny: bool) -> dict:
    import torch

    from ptuning_dist.ops.splice import _pick, slot_map, splice, splice_reference

    g = torch.Generator().manual_seed(0)
    B, S = (2, 32) if tiny else (8, 512)
    V, H = shape["vocab_size"], shape["hidden_size"]
    ids = torch.randint(0, V, (B, S), generator=g).to(device)
    rows = torch.arange(B).repeat_interleave(M).to(device)
    pos = torch.arange(M).repeat(B).to(device)
    slots = torch.arange(M).repeat(B).to(device)
    W = torch.randn(V, H, generator=g).to(device, dtype)
    table = torch.randn(M, H, generator=g).to(device).requires_grad_(True)
    grad = torch.randn(B, S, H, generator=g).to(device, dtype)
    slot = slot_map(rows, pos, slots, B, S)
    ways = {"fused": lambda: splice(ids, slot, W, table, backend="fused"),
            "reference_backend": lambda: splice(ids, slot, W, table, backend="reference"),
            "oracle": lambda: splice_reference(ids, rows, pos, slots, W, table)}
    out = {"shape": [B, S, H], "vocab": V, "dtype": str(dtype).replace("torch.", ""),
           "fused_backend": _pick(device, "fused")}
    n = 3 if tiny else 50
    for name, fn in ways.items():
        with torch.no_grad():
            fwd = median_time(fn, device, n)
        table.grad = None
        fb = median_time(lambda: fn().backward(grad), device, n)
        out[name] = {"forward_ms": fwd * 1e3, "forward_backward_ms": fb * 1e3}
    for k in ("reference_backend", "oracle"):
        out[f"fused_speedup_vs_{k}"] = {d: out[k][d] / out["fused"][d] for d in ("forward_ms", "forward_backward_ms")}
    return out


# --------------------------------------------------------------------------------------------
# 3. the RTE job: the backbone, the data, the workers


def synthetic_rte(folder: Path, seed: int = 0) -> Path:
    """FewGLUE RTE's format and lengths (premise ~20-90 words, hypothesis ~5-15), random words."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(3000)]
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 64), ("dev32", 32), ("val", 32)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for i in range(n):
                p, h = rng.choices(words, k=rng.randint(20, 90)), rng.choices(words, k=rng.randint(5, 15))
                label = "entailment" if h[0] in p else "not_entailment"
                f.write(json.dumps({"premise": " ".join(p) + " .", "hypothesis": " ".join(h), "label": label,
                                    "idx": i}) + "\n")
    return folder


def build_model(out: Path, data: Path, shape: dict, device) -> Path:
    """A LLaMA with random weights in bf16 (initialised on ``device``: seconds on a GPU) and a
    word-level tokenizer over the task's words; its vocabulary padded to ``shape['vocab_size']``."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from ptuning_dist.backbone.families import family
    from ptuning_dist.backbone.tiny import ANCHORS, word_tokenizer, words_of

    texts = [str(v) for f in sorted(data.glob("*.jsonl")) for line in f.read_text().splitlines() if line.strip()
             for v in json.loads(line).values()]
    tok = word_tokenizer(words_of(texts + [TEMPLATE, "yes no"]) + ANCHORS.split())
    shape = dict(shape, vocab_size=max(shape["vocab_size"], -(-len(tok) // 64) * 64))  # the data's words all fit
    cfg = family("llama").tiny_config(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    for k, v in shape.items():
        setattr(cfg, k, v)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads  # LlamaConfig fixed it at the tiny config's 64 / 4
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def non_embedding_params(model: Path) -> int:
    c = json.loads((model / "config.json").read_text())
    h, f, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = d * c["num_attention_heads"], d * c["num_key_value_heads"]
    return L * (h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h) + h  # q, k, v, o; gate, up, down; two norms


def job_flags(model: Path, data: Path, out: Path, tiny: bool) -> list[str]:
    micro, G = (4, 8) if tiny else (8, 32)
    return ["--model", str(model), "--task", "rte", "--data_dir", str(data), "--template", TEMPLATE,
            "--encoder", "lstm", "--sharing", "shared", "--dtype", "bfloat16", "--max_seq_len", "256",
            "--micro_batch_size", str(micro), "--global_batch_size", str(G), "--eval_batch_size", str(micro),
            "--seed", "0", "--log_every", "1000000", "--eval_every", "0", "--warmup_steps", "0",
            "--output_dir", str(out)]


class _Done(Exception):
    pass


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _memory(device) -> dict:
    import torch

    if device.type != "cuda":
        from common import proc_status

        return {"peak_rss_bytes": proc_status("VmHWM")}
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def worker_ours(args, cfg) -> dict:
    """The recipe as shipped, timed from one step's backward to the next (each period: the optimizer
    step, the next step's data, forward and backward; a device sync at each end)."""
    import torch
    from common import observed_recipe

    from ptuning_dist.ops.splice import _pick

    device = torch.device("cuda" if torch.cuda.is_available() and args.device == "cuda" else "cpu")
    cfg.train.max_steps = args.steps + 1
    rec = {"system": "ours", "step_times": [], "tokens": [], "t0": time.perf_counter()}
    state = {"last": None, "tokens": 0}

    class Hooks:
        def after_setup(self, model, encoder, engine):
            _sync(device)
            rec["setup_s"] = time.perf_counter() - rec["t0"]
            rec["setup_memory"] = _memory(device)
            rec["splice"] = _pick(device, cfg.model.splice)
            rec["backbone_dtype"] = str(next(model.frozen.parameters()).dtype)
            rec["encoder_dtype"] = str(next(encoder.parameters()).dtype)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            state["last"] = time.perf_counter()

        def after_backward(self, step, encoder):
            _sync(device)
            now = time.perf_counter()
            if 1 < step <= args.steps:  # periods 2..N: the rows PEFT's steps 2..N train on
                rec["step_times"].append(now - state["last"])
                rec["tokens"].append(state["tokens"])
            state["tokens"] = 0
            if step == args.steps + 1:
                rec["train_memory"] = _memory(device)
                raise _Done()
            state["last"] = time.perf_counter()

    class Timed(observed_recipe(Hooks())):
        def collate(self, rows, seq_len):
            b = super().collate(rows, seq_len)
            state["tokens"] += b.n_tokens
            return b

    try:
        Timed(cfg, log=lambda *a, **k: None).run()
    except _Done:
        pass
    return rec


def worker_peft(args, cfg) -> dict:
    """PEFT's P_TUNING on the same rows in the same order (vs_peft_workers.py's set-up, in bf16 on
    the device): one AdamW step per global batch, a device sync per step (its loss's .item())."""
    import torch
    from peft import PromptEncoderConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM
    from vs_peft_workers import copy_encoder_into_peft, lama_like_rows, our_initial_encoder, peft_batch

    from ptuning_dist.data.collate import SampleStream
    from ptuning_dist.train.recipe import lr_lambda

    device = torch.device("cuda" if torch.cuda.is_available() and args.device == "cuda" else "cpu")
    cfg.train.max_steps = args.steps + 1
    rec = {"system": "peft", "step_times": [], "tokens": [], "losses": [], "t0": time.perf_counter()}
    tok, template, examples = lama_like_rows(cfg)
    m = template.n_prompt
    base = AutoModelForCausalLM.from_pretrained(str(cfg.model.path), dtype=torch.bfloat16, local_files_only=True)
    h = base.get_input_embeddings().embedding_dim
    pm = get_peft_model(base, PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m, encoder_reparameterization_type="LSTM",
        encoder_hidden_size=h // 2, encoder_num_layers=2, encoder_dropout=0.0))
    enc = pm.prompt_encoder["default"]
    enc.float()  # the encoder in fp32, as ours (PEFT casts its output to the embeddings' dtype)
    copy_encoder_into_peft(our_initial_encoder(cfg.train.seed, m, h), enc)
    pm.to(device).train()
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    G, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    stream = SampleStream(len(examples), cfg.train.seed)
    _sync(device)
    rec["setup_s"] = time.perf_counter() - rec["t0"]
    rec["setup_memory"] = _memory(device)
    rec["encoder_dtype"] = str(next(enc.parameters()).dtype)
    rec["backbone_dtype"] = str(pm.get_base_model().dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        rows = [examples[j] for j in stream.take(G)]
        batches = [{k: v.to(device) for k, v in peft_batch(rows[i:i + micro], m, tok.pad_id).items()}
                   for i in range(0, G, micro)]
        loss_sum = torch.zeros((), device=device)
        for b in batches:
            loss = pm(**b).loss / len(batches)
            loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rec["losses"].append(loss_sum.item())
        now = time.perf_counter()
        if step > 1:
            rec["step_times"].append(now - t0)
            rec["tokens"].append(sum(len(e.enc.ids) for e in rows))
    rec["train_memory"] = _memory(device)
    return rec


def worker_main(argv) -> None:
    system = argv[0]
    p = argparse.ArgumentParser()
    p.add_argument("--record", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    args, rest = p.parse_known_args(argv[1:])
    from ptuning_dist.cli.common import quiet_libraries
    from ptuning_dist.cli.train import parse

    quiet_libraries()
    cfg = parse(rest)
    rec = {"ours": worker_ours, "peft": worker_peft}[system](args, cfg)
    Path(args.record).write_text(json.dumps(rec))


def run_system(system: str, flags: list[str], out: Path, steps: int, device: str, timeout: int) -> dict:
    rec_file = out / f"{system}.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "worker", system, "--record", str(rec_file), "--steps", str(steps),
                        "--device", device, *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    (out / f"{system}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"{system} failed ({p.returncode}): see {out / f'{system}.log'}\n{p.stderr[-3000:]}")
    rec = json.loads(rec_file.read_text())
    rec["wall_s"] = time.perf_counter() - t
    return rec


def summarize(rec: dict, n_params: int, rate_tflops: float, warmup: int = 1) -> dict:
    """tokens/s and MFU over the timed steps after the first ``warmup`` of them (the step rates
    already leave out step 1: with it, the first two steps)."""
    times, toks = rec["step_times"][warmup:], rec["tokens"][warmup:]
    tps = sum(toks) / sum(times)
    mem = rec.get("train_memory", {})
    return {"tokens_per_s": tps, "steps_per_s": len(times) / sum(times), "tokens_per_step": statistics.mean(toks),
            "mfu": 4 * n_params * tps / (rate_tflops * 1e12),
            "peak_memory_bytes": max(mem.get("peak_allocated_bytes", mem.get("peak_rss_bytes", 0)),
                                     rec.get("setup_memory", {}).get("peak_allocated_bytes", 0)),
            "train_peak_memory_bytes": mem.get("peak_allocated_bytes", mem.get("peak_rss_bytes")),
            "setup_s": rec["setup_s"], "wall_s": rec["wall_s"], "timed_steps": len(times),
            "backbone_dtype": rec.get("backbone_dtype"), "encoder_dtype": rec.get("encoder_dtype")}


# --------------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results folder (gpu_bench.json, gpu_bench.md, worker logs)")
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ptuning_gpu_bench"),
                   help="the model (2.2 GB in bf16), the runs' output folders, synthetic data: kept out of --out")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2 x 64 model and small shapes: the code paths, not numbers")
    p.add_argument("--data_dir", default=None, help="FewGLUE RTE (default: ../shared/data/fewglue/RTE, "
                                                    "gpu_wheels/data/fewglue/RTE, else synthetic)")
    p.add_argument("--steps", type=int, default=None, help="training steps per system (default 12; tiny 4)")
    p.add_argument("--skip_peft", action="store_true")
    p.add_argument("--worker_timeout", type=int, default=240)
    args = p.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device (use --device cpu --tiny)", file=sys.stderr)
        return 2
    from ptuning_dist.cli.common import quiet_libraries

    quiet_libraries()
    t_start = time.perf_counter()
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), torch.bfloat16
    shape = TINY if args.tiny else BIG
    steps = args.steps or (4 if args.tiny else 12)
    res = {"command": " ".join(sys.argv), "device": args.device, "tiny": args.tiny, "torch": torch.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(0)
        import triton

        res["triton"] = triton.__version__

    def save():
        res["total_s"] = time.perf_counter() - t_start
        (out / "gpu_bench.json").write_text(json.dumps(res, indent=1))
        (out / "gpu_bench.md").write_text(table(res))

    data = next((Path(d) for d in (args.data_dir, ROOT.parent / "shared" / "data" / "fewglue" / "RTE",
                                   ROOT / "gpu_wheels" / "data" / "fewglue" / "RTE")
                 if d and (Path(d) / "train.jsonl").is_file()), None)
    res["data"] = str(data) if data else "synthetic (RTE-shaped)"
    if data is None:
        data = synthetic_rte(work / "RTE")
    t = time.perf_counter()
    model = build_model(work / ("model_tiny" if args.tiny else "model_1b"), data, shape, device)
    n_params = non_embedding_params(model)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    res["model"] = {"shape": dict(shape, vocab_size=vocab), "non_embedding_params": n_params,
                    "build_s": time.perf_counter() - t, "params": n_params + 2 * vocab * shape["hidden_size"]}
    print(f"model {model}: {res['model']['params'] / 1e9:.2f}B parameters ({res['model']['build_s']:.1f}s)", flush=True)
    res["matmul"] = matmul_rate(device, dtype, shape, rows=256 if args.tiny else 2048, tiny=args.tiny)
    print(f"matmul {res['matmul']}", flush=True)
    res["splice"] = splice_bench(device, dtype, shape, args.tiny)
    print(f"splice {json.dumps(res['splice'])}", flush=True)
    save()
    rate = res["matmul"]["model_gemms"]
    res["rte"] = {}
    for system in ("ours", "peft"):
        if system == "peft" and args.skip_peft:
            continue
        run_dir = work / f"run_{system}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh output folder: no resume from an earlier bench
        flags = job_flags(model, data, run_dir, args.tiny)
        try:
            rec = run_system(system, flags, out, steps, args.device, args.worker_timeout)
            res["rte"][system] = summarize(rec, n_params, rate)
            res["rte"][system]["splice"] = rec.get("splice")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            res["rte"][system] = {"error": str(e)[-2000:]}
        print(f"rte {system}: {json.dumps(res['rte'][system])}", flush=True)
        save()
    ours, peft = res["rte"].get("ours", {}), res["rte"].get("peft", {})
    if "tokens_per_s" in ours and "tokens_per_s" in peft:
        res["rte"]["ours_vs_peft"] = {"tokens_per_s": ours["tokens_per_s"] / peft["tokens_per_s"],
                                      "peak_memory": ours["peak_memory_bytes"] / peft["peak_memory_bytes"]}
    save()
    print(table(res))
    failed = [s for s, r in res["rte"].items() if isinstance(r, dict) and "error" in r]
    return 1 if failed else 0


def table(res: dict) -> str:
    GiB = 2**30
    lines = [f"# GPU benchmark ({res.get('gpu', res['device'])}{', tiny' if res['tiny'] else ''})", "",
             f"`{res['command']}`; torch {res['torch']}, Triton {res.get('triton', '-')}, Python {res['python']}, "
             f"{res['date']}; data: {res.get('data')}", ""]
    if "matmul" in res:
        mm = res["matmul"]
        lines += [f"Matmul rate ({mm['dtype']}): {mm['model_gemms']:.4g} TFLOP/s at the model's GEMMs, "
                  f"{mm['large']:.4g} TFLOP/s large (the MFU denominator: the first).", ""]
    if "splice" in res:
        s = res["splice"]
        lines += [f"Splice, {s['dtype']}, [B, S, H] = {s['shape']}, V = {s['vocab']} (fused = {s['fused_backend']}):",
                  "", "| way | forward (ms) | forward+backward (ms) |", "|---|---|---|"]
        lines += [f"| {k} | {s[k]['forward_ms']:.3f} | {s[k]['forward_backward_ms']:.3f} |"
                  for k in ("fused", "reference_backend", "oracle")]
        lines += [""]
    if res.get("rte"):
        m = res.get("model", {})
        lines += [f"RTE job, {m.get('params', 0) / 1e9:.2f}B-parameter LLaMA shape in bf16 (encoder fp32):", "",
                  "| system | tokens/s | MFU | peak memory (GiB) | set-up (s) | timed steps |", "|---|---|---|---|---|---|"]
        for k in ("ours", "peft"):
            r = res["rte"].get(k)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {k} | failed: see {k}.log | | | | |")
                continue
            lines.append(f"| {k} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_memory_bytes'] / GiB:.2f} "
                         f"| {r['setup_s']:.1f} | {r['timed_steps']} |")
        if "ours_vs_peft" in res["rte"]:
            v = res["rte"]["ours_vs_peft"]
            lines += ["", f"Ours vs PEFT: {v['tokens_per_s']:.2f}x the tokens/s, {v['peak_memory']:.2f}x the peak memory."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
