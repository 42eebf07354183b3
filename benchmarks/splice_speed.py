"""The fused embedding splice (``ptuning::splice``) against the reference (= the common naive way:
look every token up, then ``index_put`` the prompt rows), forward and forward+backward, on CPU.

    .venv/bin/python benchmarks/splice_speed.py            # writes its section of benchmarks/RESULTS.md
    .venv/bin/python benchmarks/splice_speed.py --quick    # small shapes, a few repeats (smoke test)

Both are timed alternately in one process (the machine is shared and noisy: compare the ratio), as
the median of repeats after a warm-up; the outputs and table gradients are checked equal first.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import machine, parse_args, write_section  # noqa: E402 - benchmarks/common.py

BEGIN, END = "<!-- splice_speed:begin -->", "<!-- splice_speed:end -->"


def main() -> None:
    args = parse_args(__doc__, 10, "small shapes, 3 repeats")
    import torch

    from ptuning_dist.ops.splice import splice_reference
    from ptuning_dist.ops.splice_op import slot_map, splice

    B, S, H, M, V = (2, 64, 256, 20, 5000) if args.quick else (8, 512, 4096, 20, 50_000)
    repeats = 3 if args.quick else args.steps
    torch.manual_seed(0)
    weight_VH, ids_BS = torch.randn(V, H), torch.randint(0, V, (B, S))
    ids_BS[0, :2] = torch.tensor([0, V - 1])  # both ends of the vocabulary
    rows_N = torch.arange(B).repeat_interleave(M)
    pos_N = torch.arange(M).repeat(B)
    slots_N = torch.arange(M).repeat(B)
    slot_BS = slot_map(rows_N, pos_N, slots_N, B, S)
    table_MH = torch.randn(M, H, requires_grad=True)
    grad_BSH = torch.randn(B, S, H)

    def reference():
        return splice_reference(ids_BS, rows_N, pos_N, slots_N, weight_VH, table_MH)

    def fused():
        return splice(ids_BS, slot_BS, weight_VH, table_MH)

    with torch.no_grad():
        assert torch.equal(fused(), reference()), "fused and reference forwards differ"
    grads = []
    torch.use_deterministic_algorithms(True)  # the reference's index_put accumulate in a fixed order
    for f in (reference, fused):
        table_MH.grad = None
        f().backward(grad_BSH)
        grads.append(table_MH.grad.clone())
    torch.use_deterministic_algorithms(False)  # timed as users run it
    assert torch.equal(*grads), "fused and (deterministic) reference table gradients differ"

    def fwd(f):
        with torch.no_grad():
            f()

    def fwd_bwd(f):
        table_MH.grad = None
        f().backward(grad_BSH)

    rows = []
    for what, step in (("forward", fwd), ("forward+backward", fwd_bwd)):
        times = {"reference": [], "fused": []}
        for f in (reference, fused):
            step(f)  # warm-up (the fused op's first call builds or loads the C++ kernel)
        for _ in range(repeats):  # alternate, so both see the same machine
            for name, f in (("reference", reference), ("fused", fused)):
                t0 = time.perf_counter()
                step(f)
                times[name].append(time.perf_counter() - t0)
        ref, fus = statistics.median(times["reference"]), statistics.median(times["fused"])
        rows.append(f"| {what} | {ref * 1e3:.1f} | {fus * 1e3:.1f} | {ref / fus:.2f} |")
    table = ["| pass | reference (ms) | fused (ms) | speed-up |", "|---|---|---|---|", *rows]
    print("\n".join(table))
    if not args.quick:
        write_section(BEGIN, END, [
            "## The fused embedding splice vs the reference (issue 5)", "",
            "Command: `.venv/bin/python benchmarks/splice_speed.py`", "",
            f"Machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads. b={B}, s={S}, "
            f"h={H}, m={M} prompt slots per row, vocabulary {V}, fp32; median of {repeats} alternating repeats "
            "after a warm-up; outputs and table gradients checked bit-equal first (the reference's gradient "
            "under `torch.use_deterministic_algorithms(True)`: by default its `index_put(accumulate=True)` "
            "sums with parallel atomics at this size and changes from run to run). The reference is the "
            "common approach (look every token up, then `index_put` the prompt rows).", "", *table, ""])


if __name__ == "__main__":
    main()
