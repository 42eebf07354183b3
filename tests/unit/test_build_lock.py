"""ops/jit.py: a build lock left by a killed JIT build never hangs the next run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ptuning_dist.compat import build_lock as jit

ROOT = Path(__file__).resolve().parents[2]


def make_lock(d: Path, age_s: float) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lock = d / "lock"
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_stale_lock_removed_with_a_warning_young_one_kept(tmp_path):
    stale = make_lock(tmp_path / "deepspeed_shm_comm", 3600)
    young = make_lock(tmp_path / "ptuning_splice_cpu", 1)
    (tmp_path / "no_lock").mkdir()
    with pytest.warns(RuntimeWarning, match=r"stale build lock .*deepspeed_shm_comm/lock \(3600 s old"):
        removed = jit.clear_stale_locks(tmp_path, stale_s=600)
    assert removed == [tmp_path / "deepspeed_shm_comm"]
    assert not stale.exists() and young.exists()


def test_young_lock_waited_for_until_the_build_ends(tmp_path):
    lock = make_lock(tmp_path / "ext", 0)
    threading.Timer(0.3, lock.unlink).start()  # a live build finishing
    t0 = time.monotonic()
    assert jit.clear_stale_lock(tmp_path / "ext", stale_s=30, poll_s=0.05) is False
    assert 0.25 < time.monotonic() - t0 < 10


def test_young_lock_that_never_goes_is_removed_once_stale(tmp_path):
    lock = make_lock(tmp_path / "ext", 0)
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert jit.clear_stale_lock(tmp_path / "ext", stale_s=0.4, poll_s=0.05) is True
    assert not lock.exists()


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("PTUNING_BUILD_LOCK_STALE_S", "ten")
    with pytest.raises(ValueError, match="PTUNING_BUILD_LOCK_STALE_S='ten'"):
        jit.stale_after_s()


def test_build_root_is_torchs(monkeypatch, tmp_path):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.get_default_build_root", lambda: str(tmp_path))
    assert Path(_get_build_directory("probe", False)).parent == jit.build_root()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "x"))
    assert jit.build_root() == tmp_path / "x"


def test_splice_kernel_loads_despite_a_killed_builds_lock(tmp_path):
    """The real loader with a lock a killed build left: torch alone waits forever; ours warns,
    removes it and loads (the built kernel is copied in, so no 45 s rebuild)."""
    from ptuning_dist.ops import splice as splice_op

    assert splice_op._load_cpu(), "the CPU kernel must build here"
    built = Path(splice_op._cpu_ext.__file__).parent
    ext_dir = tmp_path / "ext"
    shutil.copytree(built, ext_dir / built.name)
    make_lock(ext_dir / built.name, 3600)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext_dir), PYTHONPATH=str(ROOT))
    code = ("import warnings, torch; warnings.simplefilter('always')\n"
            "from ptuning_dist.ops import splice as splice_op\n"
            "assert splice_op._load_cpu(), 'no kernel'\n"
            "print('LOADED')\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "LOADED" in res.stdout, res.stdout + res.stderr
    assert "stale build lock" in res.stderr
    assert not (ext_dir / built.name / "lock").exists()


def test_every_process_finds_the_interpreters_ninja(monkeypatch):
    """A venv's pip ninja and the system's hash build commands differently (ninja 1.12 changed it):
    a process whose PATH finds the other one would rebuild every JIT extension. After the call, the
    interpreter's own bin directory (where pip put ninja) comes first, once."""
    import shutil
    import sys

    from ptuning_dist.compat import build_lock

    bindir = Path(sys.executable).parent
    if not (bindir / "ninja").is_file():
        pytest.skip(f"no ninja beside {sys.executable} (the test extra installs one into the venv)")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # what a plain .venv/bin/python run gets
    build_lock.use_interpreter_ninja()
    build_lock.use_interpreter_ninja()
    assert shutil.which("ninja") == str(bindir / "ninja")
    assert os.environ["PATH"] == f"{bindir}:/usr/bin:/bin"
