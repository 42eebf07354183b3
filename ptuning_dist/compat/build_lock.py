"""JIT-built C++ extensions (our splice kernel, DeepSpeed's CPU comm op) without the stale-lock hang.

``torch.utils.cpp_extension.load`` guards a build with ``<TORCH_EXTENSIONS_DIR>/<name>/lock``,
created with O_EXCL and removed when the build ends. A job killed mid-build (Slurm preemption, a
timeout, ^C) leaves the file behind, and every later job waits on it forever, silently (seen
here). A build takes under a minute, so a lock older than ``PTUNING_BUILD_LOCK_STALE_S`` seconds
(default 600) is taken for a dead build's and removed, with a warning naming it; a younger one is
waited for, up to that age, then removed likewise. Check-and-remove runs under ``flock`` on a
side file (released by the kernel if its holder dies, so it cannot go stale itself): a rank
that waited on it sees the lock a peer has just re-created for a live build, and leaves it.

One ninja for every process (``use_interpreter_ninja``): torch runs whichever ``ninja`` PATH finds
first. A venv holds pip's (1.13 here) and the system another (1.11); ninja 1.12 changed the hash it
records for each build command, so processes that find different ones (a launcher that puts the
venv's bin first, a ``.venv/bin/python`` that does not) call every extension's command "changed"
and rebuild it whenever they alternate: about a minute per extension per switch (seen: CI 9 min
slower). The interpreter's own bin directory goes first on PATH, as an activated venv has it.
"""
from __future__ import annotations

import fcntl
import os
import time
import warnings
from pathlib import Path

DEFAULT_STALE_S = 600.0


def stale_after_s() -> float:
    raw = os.environ.get("PTUNING_BUILD_LOCK_STALE_S", str(DEFAULT_STALE_S))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"PTUNING_BUILD_LOCK_STALE_S={raw!r}: expected seconds (a number)") from None
    if value <= 0:
        raise ValueError(f"PTUNING_BUILD_LOCK_STALE_S={raw!r}: expected a positive number of seconds")
    return value


def build_root() -> Path:
    """Where torch builds extensions: TORCH_EXTENSIONS_DIR, else its default root plus the
    ``py311_cpu``-style folder (as ``torch.utils.cpp_extension._get_build_directory`` names it)."""
    import sys

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if torch.version.hip is not None:
        acc = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        acc = "cu" + torch.version.cuda.replace(".", "")
    else:
        acc = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{acc}"


def _age_s(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def clear_stale_lock(build_dir: Path, stale_s: float | None = None, wait: bool = True,
                     poll_s: float = 0.5) -> bool:
    """Make ``build_dir/lock`` safe to wait on; True if a stale one was removed. With ``wait`` a
    young lock is waited for until it goes (a live build finished) or turns stale."""
    stale_s = stale_after_s() if stale_s is None else stale_s
    lock = build_dir / "lock"
    while wait and (age := _age_s(lock)) is not None and age < stale_s:
        time.sleep(min(poll_s, stale_s - age))
    if _age_s(lock) is None:
        return False
    with open(build_dir / ".ptuning_lock_check", "a") as side:
        fcntl.flock(side, fcntl.LOCK_EX)  # one checker at a time; freed by the kernel if we die
        try:
            age = _age_s(lock)
            if age is None or age < stale_s:
                return False  # gone, or a peer re-created it for a live build
            lock.unlink()
        finally:
            fcntl.flock(side, fcntl.LOCK_UN)
    warnings.warn(f"removed a stale build lock {lock} ({age:.0f} s old, older than PTUNING_BUILD_LOCK_STALE_S="
                  f"{stale_s:.0f}): a build was killed before it finished; rebuilding", RuntimeWarning, stacklevel=2)
    return True


def clear_stale_locks(root: Path | None = None, stale_s: float | None = None) -> list[Path]:
    """Remove every stale ``<root>/<name>/lock`` without waiting on young ones (called before
    DeepSpeed builds its comm op, which goes straight to torch's unbounded wait)."""
    use_interpreter_ninja()  # and the same ninja as every other process
    root = build_root() if root is None else root
    if not root.is_dir():
        return []
    return [d for d in sorted(root.iterdir()) if (d / "lock").exists() and clear_stale_lock(d, stale_s, wait=False)]


def use_interpreter_ninja() -> None:
    """Put the directory of this interpreter (a venv's ``bin``) first on PATH when it holds a ninja
    (module docstring); processes started from here inherit it."""
    import sys

    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(bindir) / "ninja").is_file() and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def load(name: str, sources: list[str], **kwargs):
    """``torch.utils.cpp_extension.load`` after making sure its lock cannot hang us forever."""
    from torch.utils.cpp_extension import load as torch_load

    use_interpreter_ninja()
    build_dir = build_root() / name
    if build_dir.is_dir():
        clear_stale_lock(build_dir)
    return torch_load(name, sources, **kwargs)
