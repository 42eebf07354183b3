"""What the benchmark scripts share: the GPT-2-shaped backbones they measure, their command line
(a parent that runs itself as the worker under torchrun), and writing their own section of
benchmarks/RESULTS.md between a begin and an end marker, leaving the others alone."""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def build_backbone(path: Path, tiny: bool) -> Path:
    """A random-weight GPT-2 over the bundled task's word-level vocabulary: 2 x 64 (tiny) or
    GPT-2-small shaped (12 x 768)."""
    from transformers import AutoTokenizer

    from ptuning_dist.backbone.tiny import build_tiny, default_backbone

    tok = AutoTokenizer.from_pretrained(default_backbone(path / "tok"))
    size = dict(n_embd=64, n_layer=2, n_head=4) if tiny else dict(n_embd=768, n_layer=12, n_head=12)
    return build_tiny(path / ("tiny" if tiny else "model"), "gpt2", tok, seed=0, **size)


def parse_args(doc: str, steps: int, quick_help: str) -> argparse.Namespace:
    """``--quick``/``--steps`` for the parent; ``--worker --record DIR <train.py flags>`` for the
    ranks it starts (``args.rest`` holds the training flags)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help + "; does not touch RESULTS.md")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    args.rest = rest
    return args


def proc_status(key: str) -> int:
    """A byte count from /proc/self/status (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only (gloo), "
            f"{time.strftime('%Y-%m-%d')}")


def write_section(begin: str, end: str, body: list[str]) -> None:
    """Replace (or append) the text between ``begin`` and ``end`` in RESULTS.md."""
    body = [begin, *body, end]
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n\n"
    if begin in text:
        text = text[: text.index(begin)] + "\n".join(body) + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    RESULTS.write_text(text)


def observed_recipe(hooks):
    """The training recipe with two observation points: ``hooks.after_setup(model, encoder, engine)``
    once it is parallelized (before the optimizer and resume) and ``hooks.after_backward(step,
    encoder)`` where a step's encoder gradients are final (before clipping and the update)."""
    from ptuning_dist.train.recipe import PTuningRecipe

    class Observed(PTuningRecipe):
        def parallelize(self):
            super().parallelize()
            if hasattr(hooks, "after_setup"):
                hooks.after_setup(self.model, self.encoder, self.par.engine)

        def optimizer_step(self, step):
            if hasattr(hooks, "after_backward"):
                hooks.after_backward(step, self.encoder)
            super().optimizer_step(step)

    return Observed
