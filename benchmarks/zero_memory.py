"""ZeRO-0 vs ZeRO-3 vs FSDP2 at DP=2: per-rank peak resident memory, step time, frozen bytes held.

    .venv/bin/python benchmarks/zero_memory.py            # writes its section of benchmarks/RESULTS.md
    .venv/bin/python benchmarks/zero_memory.py --quick    # a tiny model, a few steps (smoke test)

The backbone is GPT-2-small shaped (12 layers, 768 wide, random weights, word-level vocabulary
of the bundled task), built once into a temporary directory. Each configuration runs the real
training loop under ``torchrun --nproc_per_node 2`` with this file as the worker; each rank
reports its own numbers, which the parent collects into a table.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import build_backbone, machine, observed_recipe, parse_args, write_section  # noqa: E402
BEGIN, END = "<!-- zero_memory:begin -->", "<!-- zero_memory:end -->"


def worker(args) -> None:
    from ptuning_dist.cli.common import quiet_libraries
    from ptuning_dist.cli.train import parse

    quiet_libraries()
    cfg = parse(args.rest)
    rec = {"step_times": []}
    last = [None]

    class Hooks:
        def after_setup(self, model, encoder, engine):
            from ptuning_dist.parallel.zero import partition_sizes

            size = model.frozen.backbone.dtype.itemsize
            sizes = partition_sizes(model.frozen)
            rec["frozen_bytes_held"] = sum(local for _, _, local in sizes) * size
            rec["frozen_bytes_full"] = sum(full for _, full, _ in sizes) * size
            rec["rss_after_setup"] = _rss_now()
            rec["peak_rss_after_setup"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            last[0] = time.perf_counter()

        def after_backward(self, step, encoder):
            now = time.perf_counter()
            rec["step_times"].append(now - last[0])
            rec["rss_last_step"] = _rss_now()
            last[0] = now

    observed_recipe(Hooks())(cfg, log=lambda *a: None).run()
    rec["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.record, f"rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(rec))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    args = parse_args(__doc__, 12, "tiny model, 3 steps")
    if args.worker:
        return worker(args)

    steps = 3 if args.quick else args.steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_backbone(tmp, tiny=args.quick)
        runs = [("zero0", "mmap"), ("zero3", "mmap"), ("fsdp2", "mmap"), ("zero3", "trim"), ("zero3", "off")]
        for name, malloc in runs[:2] if args.quick else runs:
            rec_dir = tmp / f"rec_{name}_{malloc}"
            rec_dir.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(_free_port()), __file__, "--worker", "--record", str(rec_dir), "--model", str(model),
                   *(["--fsdp2", "true"] if name == "fsdp2" else ["--ds_config", str(ROOT / "ds_configs" / f"{name}.json")]),
                   "--output_dir", str(rec_dir / "out"),
                   "--max_steps", str(steps), "--micro_batch_size", "8", "--global_batch_size", "16",
                   "--log_every", str(steps), "--host_malloc", malloc]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
            for r in (0, 1):
                rec = json.loads((rec_dir / f"rank{r}.json").read_text())
                times = rec["step_times"][2:] or rec["step_times"]
                rows.append((f"{name}, {malloc}", r, rec["peak_rss_after_setup"], rec["peak_rss_bytes"], rec["rss_last_step"],
                             statistics.median(times), rec["frozen_bytes_held"], rec["frozen_bytes_full"]))
    table = ["| config, --host_malloc | rank | peak RSS after set-up (MiB) | peak RSS (MiB) | RSS at last step (MiB) | median step (s) "
             "| frozen weights held (MiB) | of full (MiB) |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {n} | {r} | {p0 / 2**20:.0f} | {p1 / 2**20:.0f} | {now / 2**20:.0f} | {t:.3f} | {held / 2**20:.1f} "
              f"| {full / 2**20:.1f} |" for n, r, p0, p1, now, t, held, full in rows]
    print("\n".join(table))
    if not args.quick:
        _write_section(table, steps)


def _write_section(table: list[str], steps: int) -> None:
    write_section(BEGIN, END, [
        "## ZeRO-0 vs ZeRO-3 vs FSDP2 at DP=2 (issues 3 and 4)", "",
        "Command: `.venv/bin/python benchmarks/zero_memory.py`", "",
        f"Machine: {machine()}. GPT-2-small-shaped backbone (12 x 768, random "
        f"weights, fp32), P-tuning LSTM encoder, global batch 16 = micro 8 x DP 2, {steps} steps; step time "
        "is the median after 2 warm-up steps. Peak RSS includes the Python, torch and DeepSpeed runtime.",
        "", *table, ""])


def _free_port() -> int:
    from ptuning_dist.parallel.launch import free_port

    return free_port()


if __name__ == "__main__":
    main()
