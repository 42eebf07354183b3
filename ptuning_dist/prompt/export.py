"""Export and load the prompt table: ``prompt_table.safetensors`` plus a JSON sidecar.

The sidecar records what the table is only valid with: the template (and so the slot count),
hidden size, dtype, the tokenizer and the backbone (path and fingerprint). ``load_table`` checks
the file against the sidecar, and against a backbone when one is given, and refuses a mismatch.
Both files are written to a temporary name and renamed, so a crash never leaves half a table.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ptuning_dist.errors import CheckpointError
from ptuning_dist.prompt.groups import SHARED, PromptGroups

TABLE_FILE, META_FILE = "prompt_table.safetensors", "prompt_table.json"
ENCODER_FILE = "encoder.safetensors"


def _atomic_write(path: Path, write, need: int = 0) -> None:
    """``write(tmp)``, fsync, rename over ``path``; a failed write (disk full, quota, read-only) is
    one CheckpointError naming the path and the bytes it needed, its partial file removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path} ({getattr(e, 'strerror', None) or e}); it needed about "
                              f"{need:,} bytes; nothing of it is left behind") from None


def save_table(out_dir, table_MH: torch.Tensor, *, template: str, ident: dict,
               tokenizer: str, vocab_size: int, groups: PromptGroups | None = None, templates: dict | None = None,
               extra: dict | None = None) -> Path:
    """``groups``: which rows belong to which prompt group (None: one group, all rows);
    ``templates``: each row group's template (several tasks), recorded beside ``template``."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot make the prompt table directory {out_dir} ({e.strerror})") from None
    table_MH = table_MH.detach().float().cpu().contiguous()
    meta = {
        "format": "ptuning_dist.prompt_table/1",
        "template": template,
        "n_prompt": int(table_MH.shape[0]),
        "hidden_size": int(table_MH.shape[1]),
        "dtype": "float32",
        "tokenizer": tokenizer,
        "vocab_size": int(vocab_size),
        "backbone": dict(ident),
        "groups": (groups or PromptGroups.of([SHARED], int(table_MH.shape[0]))).to_json(),
        "templates": {g: t.text for g, t in (templates or {}).items()},
        **(extra or {}),
    }
    _atomic_write(out_dir / TABLE_FILE, lambda p: save_file({"prompt_table": table_MH}, str(p)),
                  table_MH.numel() * 4)
    _atomic_write(out_dir / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return out_dir


def load_table(path, ident: dict | None = None) -> tuple[torch.Tensor, dict]:
    """(table_MH, meta) from a directory holding the two files; a mismatch is a CheckpointError.
    ``meta["groups"]`` is a ``PromptGroups`` (each group's rows of the table)."""
    path = Path(path)
    tfile, mfile = path / TABLE_FILE, path / META_FILE
    for f in (tfile, mfile):
        if not f.is_file():
            raise CheckpointError(f"prompt table: {f} not found")
    try:
        meta = json.loads(mfile.read_text())
        table_MH = load_file(str(tfile))["prompt_table"]
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt export
        raise CheckpointError(f"prompt table {path}: cannot read ({e})") from None
    _check_meta(meta, mfile)
    shape = (meta["n_prompt"], meta["hidden_size"])
    if tuple(table_MH.shape) != shape:
        raise CheckpointError(f"prompt table {tfile}: shape {tuple(table_MH.shape)} != {shape} in {mfile}")
    groups = PromptGroups.from_json(meta.get("groups", {SHARED: [0, shape[0]]}), str(mfile))  # older sidecars: one
    if groups.total != shape[0]:
        raise CheckpointError(f"{mfile}: its groups cover {groups.total} rows, the table has {shape[0]}")
    meta["groups"] = groups
    if ident is not None:
        bb = meta["backbone"]
        if bb["fingerprint"] != ident["fingerprint"]:
            raise CheckpointError(f"prompt table {path} was trained on backbone {bb['path']} (fingerprint "
                                  f"{bb['fingerprint'][:12]}), not this one ({ident['path']}, {ident['fingerprint'][:12]})")
        if bb.get("tokenizer") != ident["tokenizer"]:
            raise CheckpointError(f"prompt table {path} was trained with the tokenizer of {bb['path']} (fingerprint "
                                  f"{str(bb.get('tokenizer'))[:12]}), not this one ({ident['path']}, "
                                  f"{ident['tokenizer'][:12]})")
    return table_MH, meta


def _check_meta(meta, mfile: Path) -> None:
    """The sidecar's fields, typed exactly (a bool is not a count, a number is not a path)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{mfile}: expected a JSON object")
    want = {"format": str, "template": str, "n_prompt": int, "hidden_size": int, "backbone": dict}
    for key, typ in want.items():
        if type(meta.get(key)) is not typ:
            raise CheckpointError(f"{mfile}: field {key!r} must be a {typ.__name__}, got {meta.get(key)!r}")
    if meta["n_prompt"] < 1 or meta["hidden_size"] < 1:
        raise CheckpointError(f"{mfile}: n_prompt and hidden_size must be >= 1")
    if not all(isinstance(meta["backbone"].get(k), str) for k in ("path", "fingerprint")):
        raise CheckpointError(f"{mfile}: field 'backbone' must hold the strings 'path' and 'fingerprint'")
    if not isinstance(meta.get("templates", {}), dict):
        raise CheckpointError(f"{mfile}: field 'templates' must be an object")


def one_template(meta: dict) -> str | None:
    """The table's template when every group shares it (a run's config then names it), else None
    (several tasks, each its own: they come from the tasks)."""
    distinct = set(meta.get("templates", {}).values()) or {meta["template"]}
    return meta["template"] if len(distinct) == 1 else None


def adopt_template(cfg, meta: dict) -> None:
    """A run config reading a table takes the table's template (``--template`` may only repeat it);
    a several-task table leaves the tasks' own (``check_templates`` compares them once built)."""
    if cfg.prompt.template not in (None, meta["template"]):
        raise CheckpointError(f"--template {cfg.prompt.template!r} differs from the table's {meta['template']!r}")
    if one_template(meta) is not None:
        cfg.prompt.template = meta["template"]


def check_templates(meta: dict, templates: dict, where) -> None:
    """A several-task table against the tasks' templates now (a changed task template would shift
    its prompt rows' meaning)."""
    if one_template(meta) is None:
        ours = {g: t.text for g, t in templates.items()}
        if meta["templates"] != ours:
            raise CheckpointError(f"prompt table {where}: trained with the templates {meta['templates']}, "
                                  f"these tasks have {ours}")


def save_encoder(path, encoder: torch.nn.Module) -> None:
    """The trained encoder's weights (what ``launchers/export.py`` re-exports a table from)."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    _atomic_write(Path(path), lambda p: save_file(state, str(p)), sum(v.numel() * v.element_size() for v in state.values()))


def load_encoder(path, encoder: torch.nn.Module) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder weights not found: {path}")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"encoder weights {path}: cannot read ({e})") from None
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise CheckpointError(f"encoder weights {path} do not fit this encoder: missing {missing}, "
                              f"unexpected {unexpected}, other shape {reshaped}")
    encoder.load_state_dict(state)
