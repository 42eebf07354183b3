"""Checkpoints of what trains, written atomically and verified on load.

A checkpoint is ``<output_dir>/checkpoints/step_00000100/`` with ``state.pt`` (the encoders,
optimizer, scheduler, step, the sample stream's position, the prompt groups' names, best-on-dev
state, every rank's RNG states, the run config) and ``meta.json``
(the step, the SHA-256 of ``state.pt``, the backbone's path and fingerprint, the data-parallel
size). Never the frozen backbone: a checkpoint of a billion-parameter run is the size of the
encoder and its optimizer. Because the encoder and its optimizer are replicated (not ZeRO
partitioned), a checkpoint resumes on any number of ranks.

Atomic: everything is written into ``step_N.tmp``, fsynced, then the directory is renamed; a
crash during a save leaves the previous checkpoints whole and ``step_N.tmp`` ignored.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ptuning_dist.errors import CheckpointError
from ptuning_dist.debug import maybe_fail

_STEP_RE = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out_dir: Path, step: int, state: dict, backbone: dict, dp: int, keep: int) -> Path:
    """Write checkpoint ``step`` atomically; keep the ``keep`` newest. Rank 0 only."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    _fsync(tmp / "state.pt")
    meta = {"format": "ptuning_dist.checkpoint/1", "step": step, "sha256": _sha256(tmp / "state.pt"),
            "backbone": backbone, "dp": dp}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _fsync(tmp / "meta.json")
    maybe_fail("save", step)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    for old in sorted(_complete(root))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)] if root.is_dir() else []


def load(path: Path, backbone_hash: str) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint directory, verified; a CheckpointError says what is wrong."""
    path = Path(path)
    meta_f, state_f = path / "meta.json", path / "state.pt"
    if not meta_f.is_file() or not state_f.is_file():
        raise CheckpointError(f"checkpoint {path}: missing meta.json or state.pt")
    try:
        meta = json.loads(meta_f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {meta_f}: not valid JSON ({e.msg})") from None
    if _sha256(state_f) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {state_f}: SHA-256 does not match meta.json (corrupt or partial)")
    if meta["backbone"]["fingerprint"] != backbone_hash:
        raise CheckpointError(f"checkpoint {path} belongs to backbone {meta['backbone']['path']} "
                              f"(fingerprint {meta['backbone']['fingerprint'][:12]}), not this one "
                              f"({backbone_hash[:12]})")
    state = torch.load(state_f, map_location="cpu", weights_only=False)
    return state, meta


def latest_good(out_dir: Path, backbone_hash: str, log=print) -> Path | None:
    """The newest checkpoint that verifies; broken ones are reported and skipped."""
    for path in sorted(_complete(Path(out_dir) / "checkpoints"), reverse=True):
        try:
            load(path, backbone_hash)
            return path
        except CheckpointError as e:
            log(f"skipping checkpoint: {e}")
    return None


def resume(cfg, out: Path, backbone_hash: str, encoder, opt, sched, stream, D, say, groups, selection) -> int:
    """Restore the checkpoint ``cfg.train.resume`` names (or the newest good one for 'auto') into
    the encoder, optimizer, scheduler, sample stream and this rank's RNG; returns the step to
    continue after. Pipeline stages after the first have no encoder: they restore the rest."""
    if cfg.train.resume is None:
        return 0
    path = latest_good(out, backbone_hash, say) if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if path is None:
        say(f"--resume auto: no checkpoint in {out / 'checkpoints'}; starting from step 0")
        return 0
    state, meta = load(path, backbone_hash)
    if state.get("groups") != list(groups.names):
        raise CheckpointError(f"checkpoint {path} holds the prompt groups {state.get('groups')}, this run has "
                              f"{list(groups.names)} (data.relations / prompt.sharing differ)")
    if encoder is not None:  # pipeline stages after the first hold no encoder
        encoder.load_state_dict(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    stream.load_state(state["stream"])
    selection.load_state(state["selection"])
    rngs = state["rng"]
    set_rng_state(rngs[D.rank] if len(rngs) == D.world else rngs[0])
    was_global = state["run_config"]["train"]["global_batch_size"]
    if len(rngs) != D.world or was_global != cfg.train.global_batch_size:
        order = ("the global sample order is kept" if was_global == cfg.train.global_batch_size else
                 f"the global batch changes from {was_global} to {cfg.train.global_batch_size}, so the data order "
                 "changes too (set --global_batch_size to keep it)")
        say(f"resuming a {len(rngs)}-rank checkpoint on {D.world} ranks: each rank's share of every batch and "
            f"the per-rank RNG streams change; {order}")
    say(f"resumed from {path} at step {state['step']}")
    return state["step"]


def save_step(out: Path, step: int, cfg, encoder, opt, sched, stream, backbone_id: dict, D, groups,
              selection) -> None:
    """Every rank's RNG gathered; rank 0 (first pipeline stage: it holds the encoder) writes."""
    rng = [None] * D.world
    if D.world > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    if D.is_main:
        state = {"step": step, "samples": stream.consumed, "stream": stream.state(), "groups": list(groups.names),
                 "selection": selection.state(), "encoder": encoder.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "rng": rng, "run_config": cfg.to_dict()}
        save(out, step, state, backbone_id, D.world, cfg.train.keep_checkpoints)
    D.barrier()
