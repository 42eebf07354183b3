"""Checkpoints of what trains, written atomically and verified on load; loading runs no code.

A checkpoint is ``<output_dir>/checkpoints/step_00000100/`` with ``state.safetensors`` and
``state.json`` (``train/statefile.py``: the encoders, optimizer, scheduler, step, the sample
stream's position, the prompt groups' names, best-on-dev state, every rank's RNG states, the run
config: tensors in safetensors, the rest JSON) and ``meta.json`` (the step, the SHA-256 of both
files, the backbone's path and fingerprint and the tokenizer's, the data-parallel size). Never the
frozen backbone: a checkpoint of a billion-parameter run is the size of the encoder and its
optimizer. Because the encoder and its optimizer are replicated (not ZeRO partitioned), a
checkpoint resumes on any number of ranks.

Atomic: everything is written into ``step_N.tmp``, fsynced, then the directory is renamed; a
crash during a save leaves the previous checkpoints whole and ``step_N.tmp`` ignored. A write that
fails (disk full, quota, read-only) removes the partial ``step_N.tmp`` and is one error naming the
path and the bytes it needed; free space is checked before writing. Old pickled checkpoints
(``state.pt``) are refused: ``python -m ptuning_dist.train.checkpoint convert DIR`` converts one
you trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from ptuning_dist.debug import maybe_fail
from ptuning_dist.errors import CheckpointError
from ptuning_dist.train import statefile

_STEP_RE = re.compile(r"^step_(\d{8})$")
FORMAT = "ptuning_dist.checkpoint/2"
META = "meta.json"


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


def state_bytes(x) -> int:
    """About what a save of ``x`` writes: its tensors' bytes plus room for the JSON tree."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(state_bytes(v) for v in x.values()) + 64 * len(x)
    if isinstance(x, (list, tuple)):
        return sum(state_bytes(v) for v in x) + 16 * len(x)
    return 32


def save(out_dir: Path, step: int, state: dict, backbone: dict, dp: int, keep: int) -> Path:
    """Write checkpoint ``step`` atomically; keep the ``keep`` newest. Rank 0 only. A failed write
    is a CheckpointError (the partial directory removed, the older checkpoints untouched)."""
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    need = state_bytes(state)
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free < need:
            raise CheckpointError(f"checkpoint {final}: needs about {need:,} bytes, {root} has {free:,} free; "
                                  "nothing written (free space, or --output_dir elsewhere, then --resume auto)")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = statefile.write(tmp, state)
        for f in files:
            _fsync(f)
        meta = {"format": FORMAT, "step": step, "sha256": {f.name: _sha256(f) for f in files},
                "backbone": backbone, "dp": dp}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        _fsync(tmp / META)
        maybe_fail("save", step)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
    except (OSError, SafetensorError) as e:  # disk full, quota, read-only, permissions: where and how much
        shutil.rmtree(tmp, ignore_errors=True)
        why = f"{e.filename or tmp} ({e.strerror or e})" if isinstance(e, OSError) else f"{tmp} ({e})"
        raise CheckpointError(f"checkpoint {final}: cannot write {why}; it "
                              f"needed about {need:,} bytes; the partial {tmp.name} is removed, the older "
                              "checkpoints are intact") from None
    for old in sorted(_complete(root))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)] if root.is_dir() else []


def _read_meta(path: Path) -> dict:
    meta_f = path / META
    if (path / "state.pt").is_file() and not (path / statefile.TREE).is_file():
        raise CheckpointError(f"checkpoint {path}: a pickled state.pt (older ptuning-dist), which this version does "
                              "not load (unpickling can run code); if you trust it, convert it once with "
                              f"`python -m ptuning_dist.train.checkpoint convert {path}`")
    for f in (meta_f, path / statefile.TENSORS, path / statefile.TREE):
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: missing {f.name}")
    try:
        meta = json.loads(meta_f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {meta_f}: not valid JSON ({e})") from None
    ok = (isinstance(meta, dict) and meta.get("format") == FORMAT and type(meta.get("step")) is int
          and meta["step"] >= 0 and type(meta.get("dp")) is int and isinstance(meta.get("sha256"), dict)
          and isinstance(meta.get("backbone"), dict)
          and all(isinstance(meta["backbone"].get(k), str) for k in ("path", "fingerprint", "tokenizer")))
    if not ok:
        raise CheckpointError(f"checkpoint {meta_f}: not a {FORMAT} record (format, step, dp, sha256, backbone "
                              "path/fingerprint/tokenizer)")
    return meta


def load(path: Path, ident: dict) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint directory, verified against the files' hashes and this run's
    backbone and tokenizer (``ident``: fingerprint, tokenizer); a CheckpointError says what is wrong."""
    path = Path(path)
    meta = _read_meta(path)
    for name in (statefile.TENSORS, statefile.TREE):
        if _sha256(path / name) != meta["sha256"].get(name):
            raise CheckpointError(f"checkpoint {path / name}: SHA-256 does not match {META} (corrupt or partial)")
    bb = meta["backbone"]
    if bb["fingerprint"] != ident["fingerprint"]:
        raise CheckpointError(f"checkpoint {path} belongs to backbone {bb['path']} (fingerprint "
                              f"{bb['fingerprint'][:12]}), not this one ({ident['path']}, {ident['fingerprint'][:12]})")
    if bb["tokenizer"] != ident["tokenizer"]:
        raise CheckpointError(f"checkpoint {path} was trained with the tokenizer of {bb['path']} (fingerprint "
                              f"{bb['tokenizer'][:12]}), not this one ({ident['path']}, {ident['tokenizer'][:12]})")
    state = statefile.read(path)
    if not isinstance(state, dict) or state.get("step") != meta["step"]:
        raise CheckpointError(f"checkpoint {path}: {statefile.TREE} does not hold step {meta['step']}")
    return state, meta


def latest_good(out_dir: Path, ident: dict, log=print) -> Path | None:
    """The newest checkpoint that verifies; broken ones are reported and skipped."""
    for path in sorted(_complete(Path(out_dir) / "checkpoints"), reverse=True):
        try:
            load(path, ident)
            return path
        except CheckpointError as e:
            log(f"skipping checkpoint: {e}")
    return None


def _fits(path: Path, what: str, saved: dict, own: dict) -> None:
    """A state dict from the checkpoint against this run's: same keys and shapes, else an error."""
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    shaped = sorted(k for k in set(own) & set(saved)
                    if not isinstance(saved[k], torch.Tensor) or saved[k].shape != own[k].shape)
    if missing or extra or shaped:
        raise CheckpointError(f"checkpoint {path}: its {what} does not fit this run's (another prompt.encoder or "
                              f"template?): missing {missing[:4]}, unexpected {extra[:4]}, other shape {shaped[:4]}")


def resume(cfg, out: Path, ident: dict, encoder, opt, sched, stream, D, say, groups, selection) -> int:
    """Restore the checkpoint ``cfg.train.resume`` names (or the newest good one for 'auto') into
    the encoder, optimizer, scheduler, sample stream and this rank's RNG; returns the step to
    continue after. Pipeline stages after the first have no encoder: they restore the rest."""
    if cfg.train.resume is None:
        return 0
    path = latest_good(out, ident, say) if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if path is None:
        say(f"--resume auto: no checkpoint in {out / 'checkpoints'}; starting from step 0")
        return 0
    state, meta = load(path, ident)
    if state.get("groups") != list(groups.names):
        raise CheckpointError(f"checkpoint {path} holds the prompt groups {state.get('groups')}, this run has "
                              f"{list(groups.names)} (data.relations / prompt.sharing differ)")
    if state["step"] > cfg.train.max_steps:
        raise CheckpointError(f"checkpoint {path} is at step {state['step']}, past train.max_steps "
                              f"{cfg.train.max_steps}: nothing to train (raise --max_steps)")
    if encoder is not None:  # pipeline stages after the first hold no encoder
        _fits(path, "encoder", state["encoder"], encoder.state_dict())
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


def save_step(out: Path, step: int, cfg, encoder, opt, sched, stream, ident: dict, D, groups, selection) -> None:
    """Every rank's RNG gathered; rank 0 (first pipeline stage: it holds the encoder) writes; every
    rank learns whether the write worked (a failed save is an error on all ranks, not a hang)."""
    rng = [None] * D.world
    if D.world > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    error = None
    if D.is_main:
        state = {"step": step, "samples": stream.consumed, "stream": stream.state(), "groups": list(groups.names),
                 "selection": selection.state(), "encoder": encoder.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "rng": rng, "run_config": cfg.to_dict()}
        try:
            save(out, step, state, ident, D.world, cfg.train.keep_checkpoints)
        except CheckpointError as e:
            error = str(e)
    if D.world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)  # host sync: save steps only
        error = box[0]
    if error is not None:
        raise CheckpointError(error if D.is_main else f"rank 0 could not save the checkpoint of step {step}")


def read_state(path) -> dict:
    """A checkpoint's state without verifying it against a backbone (tests, tools)."""
    return statefile.read(Path(path))


def _convert(path: Path) -> None:
    """Rewrite a trusted pickled checkpoint (``state.pt``, format 1) in this format, in place."""
    meta = json.loads((path / META).read_text())
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)  # trusted by the caller
    files = statefile.write(path, state)
    meta.update(format=FORMAT, sha256={f.name: _sha256(f) for f in files})
    meta["backbone"].setdefault("tokenizer", "unknown (converted from format 1)")
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")
    (path / "state.pt").rename(path / "state.pt.converted")
    print(f"converted {path}; its tokenizer fingerprint is unknown: set meta.json's backbone.tokenizer to the "
          "one a new checkpoint of the same run records, or resume from a new checkpoint")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "convert":
        sys.exit("usage: python -m ptuning_dist.train.checkpoint convert CHECKPOINT_DIR  (unpickles it: only files "
                 "you trust)")
    _convert(Path(sys.argv[2]))
