"""What the gpu tier's tests share: a synthetic RTE-shaped task (no ../shared data on the GPU machine),
LLaMA-shaped models with random weights over its words, and runs of ``gpu_worker.py`` (one process per
run, so each gets its own CUDA context, peak-memory counters and process group; the CPU references
run with ``CUDA_VISIBLE_DEVICES=""``).

Records: each test may write what it measured under ``$GPU_CHECK_OUT`` (benchmarks/gpu_check.sh sets
it; default: nowhere) so that the numbers come back from the GPU machine whether the test passes or not.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().with_name("gpu_worker.py")
M = 6  # prompt tokens
TEMPLATE = f"[P*{M}] {{premise}} Question: {{hypothesis}} ? Answer: [MASK]"  # a prefix template (PEFT's layout too)
WORDS = [f"w{i}" for i in range(400)]
# the small LLaMA of the training runs: GQA (4 heads in 2 groups), untied head, RMSNorm, SwiGLU, RoPE
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
# the shipped layout of a real run: bf16 backbone (the encoder stays fp32), recompute, packed forwards
RUN = ["--activation_checkpointing", "true", "--packing", "on"]


def write_rte(folder: Path, n_train: int = 64, n_dev: int = 16, premise_words=(20, 60), hypothesis_words=(4, 12),
              seed: int = 0) -> Path:
    """train/dev32/val.jsonl in FewGLUE's RTE format. Lengths are drawn from the given ranges (equal
    bounds: every row has the same length, so padded micro-batches have one known shape). The label
    is whether the hypothesis's first word occurs in the premise: learnable, not trivially."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def row(i):
        premise = rng.choices(WORDS, k=rng.randint(*premise_words))
        hyp = rng.choices(WORDS, k=rng.randint(*hypothesis_words))
        label = "entailment" if hyp[0] in premise else "not_entailment"
        return {"premise": " ".join(premise) + " .", "hypothesis": " ".join(hyp), "label": label, "idx": i}

    for name, n in (("train", n_train), ("dev32", n_dev), ("val", n_dev)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(n)))
    return folder


def build_llama(out: Path, data: Path, seed: int = 0, **shape) -> Path:
    """A LLaMA-shaped model (random weights, ``shape`` overriding the family's tiny config) with a
    word-level tokenizer over the task's words, the template's and the verbalizer's."""
    if (out / "config.json").is_file():
        return out
    from ptuning_dist.backbone.tiny import ANCHORS, build_tiny, word_tokenizer, words_of

    texts = [str(v) for f in sorted(data.glob("*.jsonl")) for line in f.read_text().splitlines()
             for v in json.loads(line).values()]
    tok = word_tokenizer(words_of(texts + [TEMPLATE, "yes no"]) + ANCHORS.split())
    shape.setdefault("initializer_range", 0.2)  # a random head at 0.02 predicts nothing a prompt could move
    if "hidden_size" in shape and "num_attention_heads" in shape:  # LlamaConfig fixed head_dim at the tiny
        shape.setdefault("head_dim", shape["hidden_size"] // shape["num_attention_heads"])  # config's 64 / 4
    return build_tiny(out, "llama", tok, seed=seed, **shape)


def job(model: Path, data: Path, out: Path, *extra) -> list[str]:
    """The RTE job's train.py flags (shared prompt, LSTM encoder), then ``extra``."""
    return ["--model", str(model), "--task", "rte", "--data_dir", str(data), "--template", TEMPLATE,
            "--encoder", "lstm", "--sharing", "shared", "--micro_batch_size", "8", "--global_batch_size", "16",
            "--max_steps", "4", "--log_every", "1", "--eval_every", "0", "--warmup_steps", "0", "--seed", "0",
            "--max_seq_len", "256", "--test_split", "dev32", "--output_dir", str(out), *map(str, extra)]


def run_worker(flags: list[str], record: Path, cpu: bool = False, worker_flags=(), timeout: int = 300,
               env: dict | None = None) -> dict:
    """One training run through ``gpu_worker.py``; returns its record (asserting it exited 0)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
             OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    e.pop("PTUNING_FAULT", None)
    if cpu:
        e["CUDA_VISIBLE_DEVICES"] = ""
    e.update(env or {})
    p = subprocess.run([sys.executable, str(WORKER), "--record", str(record), *map(str, worker_flags), *flags],
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"worker failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    rec = json.loads(record.read_text())
    rec["grads_file"] = str(record) + ".grads.pt"
    return rec


def grads(rec: dict) -> dict:
    """The encoder's gradients at the worker's --grads_step (fp32, on the CPU)."""
    import torch

    return torch.load(rec["grads_file"])


def cosine(a: dict, b: dict) -> float:
    """Cosine similarity of two runs' encoder gradients, all parameters as one vector."""
    import torch

    assert a.keys() == b.keys() and a
    x = torch.cat([a[k].flatten() for k in sorted(a)])
    y = torch.cat([b[k].flatten() for k in sorted(b)])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def save_record(name: str, data: dict) -> None:
    """What a test measured, as $GPU_CHECK_OUT/<name>.json (nothing without GPU_CHECK_OUT)."""
    out = os.environ.get("GPU_CHECK_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))


def rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))
