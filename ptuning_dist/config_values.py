"""Reading values into the config tree: each value checked against its field's declared type
(exactly: a bool is not an integer, 3.0 is not a step count, a number is not a path; numbers finite,
strings not empty), ``Literal`` choices, field docstrings (the flags' ``--help``), and the JSON/YAML
files the product reads, every error naming the field or file. Imports no torch (``config.py`` holds
the tree itself)."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import textwrap
import typing
from pathlib import Path
from typing import Literal

from ptuning_dist.errors import ConfigError


def choices(literal) -> tuple:
    """The values of a ``Literal`` type, in their written order."""
    return typing.get_args(literal)


def one_of(values) -> str:
    """'a, b or c'."""
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def _require(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}")


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), read from the source."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def literal_choices(typ) -> tuple | None:
    """The choices of a ``Literal`` (or optional ``Literal``) field type, else None."""
    args = [a for a in typing.get_args(typ) if a is not type(None)] if typing.get_origin(typ) is not Literal else [typ]
    lit = next((a for a in args if typing.get_origin(a) is Literal), None)
    return typing.get_args(lit) if lit is not None else None


def _optional(typ) -> bool:
    return type(None) in typing.get_args(typ)


def coerce(value, typ, name: str):
    """Check/convert a value from a file or flag to the field's declared type (``name`` in errors)."""
    if value is None:
        _require(_optional(typ), name, "may not be null")
        return None
    allowed = literal_choices(typ)
    if allowed is not None:  # a flag gives a string: compare in the choices' own type
        if isinstance(value, str) and not isinstance(allowed[0], str):
            try:
                value = type(allowed[0])(value)
            except ValueError:
                pass
        _require(value in allowed and (not isinstance(value, bool) or isinstance(allowed[0], bool)), name,
                 f"{value!r} is not {one_of(allowed)}")
        return value
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    base = args[0] if args else typ
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        _require(isinstance(value, list) and len(value) > 0, name, f"expected a non-empty list, got {value!r}")
        _require(all(isinstance(v, str) and v.strip() for v in value), name,
                 f"expected non-empty strings, got {value!r}")
        return [v.strip() for v in value]
    if base is bool:  # exactly a bool (a flag's true/false): 1 or "yes" is not one
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        _require(isinstance(value, bool), name, f"expected true or false, got {value!r}")
        return value
    if base is int:  # exactly an integer: a bool is not one, nor is 3.0
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                pass
        _require(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name,
                 f"expected a number, got {value!r}")
        _require(math.isfinite(value), name, f"must be a finite number, got {value!r}")
        return float(value)
    if base is str:
        _require(isinstance(value, str), name, f"expected a string, got {value!r}")
        _require(bool(value.strip()), name, "may not be empty (leave it out for the default)")
        return value
    raise TypeError(f"{name}: no rule for the type {typ}")  # a field of a new type: add its rule here


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from ``path``; a missing file, bad JSON (with its line) or another type is a
    ConfigError naming ``what`` (the flag or field that gave the path) and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object")
    return raw


def load_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - report any parse error with the file name
        raise ConfigError(f"--config {path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections")
    return data
