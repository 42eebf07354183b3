"""benchmarks/vs_peft.py --quick: the PEFT comparison cannot rot, and it is a fair one.

Runs the benchmark's quick mode (a 2 x 128 GPT-2, a few full-batch steps; one process for both
jobs and 2-rank ZeRO-3 for the LAMA-style job) and reads its ``CHECK`` lines: the same prompt
table gives the same loss through PEFT and through ours (1e-5), packed and padded batches give the
same loss, both encoders start from the same weights, the real training loops' losses agree step by
step where both score the full vocabulary (and ours packed with ours padded),
every system lowers the loss, and the profiler breakdown is produced. Nothing is timed.
"""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

import peft  # noqa: E402,F401 - in the test extra: a missing PEFT fails, never skips

EXPECTED = [
    "fair_loss_lama", "fair_loss_rte", "same_encoder_lama", "same_encoder_rte",
    "packed_is_padded_lama", "packed_is_padded_rte",
    "same_losses_ours_peft_lama_1proc", "same_losses_ours_peft_lama_zero3",
    "packed_same_losses_lama_1proc", "packed_same_losses_rte_1proc",
    *(f"loss_decreases_{s}_{c}" for s in ("ours", "peft") for c in ("lama_1proc", "rte_1proc", "lama_zero3")),
    *(f"profile_{s}_{c}" for s in ("ours", "peft") for c in ("lama_1proc", "rte_1proc")),
]


def test_quick_mode_is_fair_and_learns(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_peft.py"), "--quick", "--work", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    checks = {m.group(1): (m.group(2) == "True", m.group(0))
              for m in re.finditer(r"^CHECK (\S+) ok=(True|False).*$", p.stdout, re.M)}
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    missing = [name for name in EXPECTED if name not in checks]
    assert not missing, f"checks not reported: {missing}\n{p.stdout[-3000:]}"
    failed = [line for ok, line in checks.values() if not ok]
    assert not failed, "\n".join(failed)
    # the fairness numbers themselves, not only the flags
    for task in ("lama", "rte"):
        diff = float(re.search(rf"^CHECK fair_loss_{task} .* diff=(\S+)", p.stdout, re.M).group(1))
        assert diff < 1e-5
    for system in ("ours", "peft"):
        m = re.search(rf"^CHECK loss_decreases_{system}_lama_1proc ok=True first=(\S+) last=(\S+)", p.stdout, re.M)
        assert float(m.group(2)) < float(m.group(1))
