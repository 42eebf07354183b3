"""A training state (nested dicts of tensors, numbers, strings, RNG tuples) as two files that load
without running code: ``state.safetensors`` (every tensor) and ``state.json`` (the rest of the tree,
tensors replaced by references into the safetensors file).

Why not ``torch.save``: unpickling a file can run any code it names, so a crafted checkpoint would
execute on ``--resume`` (a SHA-256 beside it is written by whoever writes it: no defence). Here
loading only ever builds dicts, lists, tuples, numbers, strings, tensors and numpy arrays.

The JSON encoding of what plain JSON cannot say (one key per marker object)::

    {"$tensor": "t3"}                      a tensor, stored in the safetensors file under t3
    {"$tuple": [...]}                      a tuple (Python's random.getstate() is one)
    {"$ndarray": [...], "dtype": "uint32"} a numpy array (numpy's RNG state holds one)
    {"$items": [[key, value], ...]}        a dict whose keys are not all strings (optimizer state)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ptuning_dist.errors import CheckpointError

TENSORS, TREE = "state.safetensors", "state.json"
_MARKERS = ("$tensor", "$tuple", "$ndarray", "$items")


def encode(state) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able tree, tensors by name) of a state."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x):
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
            return {"$tensor": name}
        if isinstance(x, np.ndarray):
            return {"$ndarray": x.tolist(), "dtype": str(x.dtype)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, tuple):
            return {"$tuple": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) and k not in _MARKERS for k in x):
                return {k: enc(v) for k, v in x.items()}
            return {"$items": [[enc(k), enc(v)] for k, v in x.items()]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint")  # a programming error

    return enc(state), tensors


def decode(tree, tensors: dict[str, torch.Tensor], where: str):
    """The state ``encode`` gave ``tree`` and ``tensors``; anything else is a CheckpointError."""

    def bad(msg):
        raise CheckpointError(f"checkpoint {where}: {msg}")

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        marker = next((k for k in x if k in _MARKERS), None)
        if marker is None:
            return {k: dec(v) for k, v in x.items()}
        v = x[marker]
        if marker == "$tensor":
            if not isinstance(v, str) or v not in tensors:
                bad(f"refers to a tensor {v!r} that {TENSORS} does not hold")
            return tensors[v]
        if marker == "$tuple" and isinstance(v, list):
            return tuple(dec(e) for e in v)
        if marker == "$ndarray" and isinstance(v, list) and x.get("dtype") in ("uint32", "int64", "float64"):
            return np.asarray(v, dtype=x["dtype"])
        if marker == "$items" and isinstance(v, list) and all(isinstance(e, list) and len(e) == 2 for e in v):
            try:
                return {dec(k): dec(e) for k, e in v}
            except TypeError:
                bad("a dict key that is not a number or string")
        bad(f"malformed {marker} entry in {TREE}")

    return dec(tree)


def write(directory: Path, state) -> list[Path]:
    """Write ``state`` into ``directory``; returns the files written (to fsync and hash)."""
    tree, tensors = encode(state)
    save_file(tensors, str(directory / TENSORS))
    (directory / TREE).write_text(json.dumps(tree) + "\n")
    return [directory / TENSORS, directory / TREE]


def read(directory: Path):
    where = str(directory)
    try:
        tensors = load_file(str(directory / TENSORS))
    except Exception as e:  # noqa: BLE001 - safetensors' own parser: any failure is a corrupt file
        raise CheckpointError(f"checkpoint {directory / TENSORS}: not a readable safetensors file ({e})") from None
    try:
        tree = json.loads((directory / TREE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {directory / TREE}: not valid JSON ({e})") from None
    return decode(tree, tensors, where)
