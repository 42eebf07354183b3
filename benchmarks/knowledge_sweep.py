"""P-tuning the embedded knowledge LM (``backbone/knowledge.py``): one prompt per relation against
one shared prompt and the manual templates, and the learning-rate / budget sweep behind the
defaults. In-process runs of the training recipe, one after another (CPU).

    .venv/bin/python benchmarks/knowledge_sweep.py           # writes its section of benchmarks/RESULTS.md
    .venv/bin/python benchmarks/knowledge_sweep.py --quick   # two short runs (smoke test)

Each row: macro P@1 over the four relations on dev (what selection reads) and test (held-out
subjects), and the test P@1 of every relation.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import machine, parse_args, write_section  # noqa: E402 - benchmarks/common.py

from ptuning_dist.config import from_dict  # noqa: E402
from ptuning_dist.train.recipe import train  # noqa: E402

BEGIN, END = "<!-- knowledge_sweep:begin -->", "<!-- knowledge_sweep:end -->"
BUDGETS = {"300 steps": {"train.max_steps": 300},
           "15 epochs, best on dev, patience 5": {"train.epochs": 15, "train.eval_every_epoch": True,
                                                  "train.patience": 5}}


def one(work: Path, name: str, over: dict) -> tuple[dict, float]:
    cfg = from_dict({}, {"train.output_dir": str(work / name.replace(" ", "_").replace(",", "")), **over})
    t0 = time.perf_counter()
    res = train(cfg, log=lambda *a: None)
    return res, time.perf_counter() - t0


def row(label: str, res: dict, secs: float) -> str:
    test = res["test"]["ptuning"]
    per = " / ".join(f"{test['p@1_per_relation'][r]:.2f}" for r in sorted(test["p@1_per_relation"]))
    return (f"| {label} | {res['ptuning']['p@1_macro']:.3f} | {test['p@1_macro']:.3f} | {per} | "
            f"{res['step']} | {secs:.0f} |")


def main():
    args = parse_args(__doc__, steps=0, quick_help="two short runs")
    work = Path(tempfile.mkdtemp(prefix="knowledge_sweep_"))
    head = ["| run | dev P@1 | test P@1 | test P@1 per relation (P17 / P30 / P36 / P38) | steps run | s |",
            "|---|---|---|---|---|---|"]
    rows = []
    if args.quick:
        for sharing in ("per_group", "shared"):
            res, s = one(work, sharing, {"prompt.sharing": sharing, "train.max_steps": 20})
            print(row(sharing, res, s), flush=True)
        return
    res, s = one(work, "default", {})
    manual = res["test"]["manual_baseline"]
    rows.append(f"| manual templates (LAMA's) | {res['manual_baseline']['p@1_macro']:.3f} | {manual['p@1_macro']:.3f} | "
                + " / ".join(f"{manual['p@1_per_relation'][r]:.2f}" for r in sorted(manual["p@1_per_relation"]))
                + " | - | - |")
    rows.append(row("**default** (per relation, lr 5e-3, 300 steps)", res, s))
    res, s = one(work, "shared", {"prompt.sharing": "shared"})
    rows.append(row("one shared prompt (lr 5e-3, 300 steps)", res, s))
    for budget, over in BUDGETS.items():
        for lr in (1e-3, 5e-3, 2e-2):
            res, s = one(work, f"{budget} {lr}", {**over, "train.lr": lr})
            rows.append(row(f"per relation, lr {lr:g}, {budget}", res, s))
            print(rows[-1], flush=True)
    write_section(BEGIN, END, [
        "## P-tuning the embedded knowledge LM: a prompt per relation, shared, manual (issue 15)", "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/knowledge_sweep.py`. The backbone is "
        "the embedded default (`backbone/knowledge.py`: a 4 x 128 GPT-2 pretrained here for 1500 steps on "
        "sentences stating GeoNames facts, never in LAMA's phrasing), the task its LAMA-layout probe (161 "
        "countries' capital P36, continent P30 and currency P38, 150 cities' country P17; subjects split 60/20/20 "
        "into train/dev/test), objects restricted to the probe's objects, micro-batch 16, the LSTM encoder.", "",
        *head, *rows, "",
        "A shared prompt cannot tell which relation is asked about a country (the same `[P*3] France [P*3]`), "
        "so it scores about what picking one of three relations' objects would; one prompt per relation "
        "recovers the facts. The learning-rate / budget rows all land within 0.06 test P@1 of each other "
        "(107 test facts, about 27 a relation: one fact moves the macro by about 0.009), and the best dev score (what a choice may read) is within 4 dev "
        "facts of the default's: the defaults stay lr 5e-3 and 300 steps (the cheapest good setting, no "
        "evaluation inside the loop); `--epochs` with `--eval_every_epoch true --patience 5` is the "
        "paper's way and costs an evaluation per epoch. No English-knowing backbone can be built here (no "
        "model hub), so the FewGLUE tasks have no such sweep: their defaults are unmeasured for accuracy.",
    ])


if __name__ == "__main__":
    main()
