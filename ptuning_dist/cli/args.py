"""Flags generated from config dataclasses: one ``--flag`` per field, its help the field's docstring
with its default and choices, its value parsed by ``config.coerce`` (an error names the field).

A field's flag is its name unless its metadata says ``flag`` (``model.path`` is ``--model``) or adds
``aliases``. Boolean fields take ``--flag``, ``--flag true`` or ``--flag false``. A field without a
default is a required flag. So a new config field is a new, documented flag of every entry point
that takes its section, and nothing is kept by hand beside the dataclasses.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from ptuning_dist.config import SECTIONS, RunConfig, coerce, field_docs, from_dict, literal_choices, load_file, one_of


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f.name)


def _help(cls, f: dataclasses.Field, typ, dotted: str | None) -> str:
    doc = field_docs(cls).get(f.name)
    if not doc:
        raise TypeError(f"{cls.__name__}.{f.name} has no docstring: every flag's --help comes from one")
    notes = []
    if f.default is not dataclasses.MISSING:
        notes.append(f"default: {f.default}")
    elif f.default_factory is dataclasses.MISSING:
        notes.append("required")
    allowed = literal_choices(typ)
    if allowed is not None:
        notes.append(f"one of {one_of(allowed)}")
    if dotted:
        notes.append(f"config: {dotted}")
    return f"{doc} ({'; '.join(notes)})".replace("%", "%%")


def add_fields(parser: argparse.ArgumentParser, cls, section: str | None = None,
               only: typing.Collection[str] | None = None) -> dict[str, str]:
    """Add a flag for each field of ``cls`` (those named in ``only``, if given); returns
    {argparse dest: field} where field is ``section.name`` for a run-config section, else ``name``."""
    hints = typing.get_type_hints(cls)
    dests = {}
    for f in dataclasses.fields(cls):
        dotted = f"{section}.{f.name}" if section else f.name
        if only is not None and dotted not in only:
            continue
        typ, flag = hints[f.name], flag_of(f)
        kw = dict(dest=flag, help=_help(cls, f, typ, dotted if section else None), default=None)
        if typ is bool or typing.get_args(typ) == (bool, type(None)):
            kw.update(nargs="?", const="true", metavar="true|false")
        elif (allowed := literal_choices(typ)) is not None:
            kw["metavar"] = "{" + ",".join(map(str, allowed)) + "}"
        else:
            kw["metavar"] = f.name.upper()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw["required"] = True
        parser.add_argument(f"--{flag}", *f.metadata.get("aliases", ()), **kw)
        if flag in dests:
            raise TypeError(f"two fields would share the flag --{flag}")
        dests[flag] = dotted
    return dests


def add_run_config(parser: argparse.ArgumentParser, only: typing.Collection[str] | None = None) -> dict[str, str]:
    """``--config`` and a flag for each run-config field (or those dotted names in ``only``)."""
    parser.add_argument("--config", help="a YAML/JSON run config (sections model, prompt, data, train, "
                                         "parallel); flags override it")
    dests = {}
    for name, cls in SECTIONS.items():
        dests.update(add_fields(parser, cls, name, only))
    return dests


def run_config(args: argparse.Namespace, dests: dict[str, str]) -> RunConfig:
    """The run config of ``--config`` (if any) with the given flags on top."""
    base = load_file(args.config) if args.config else {}
    return from_dict(base, {dotted: getattr(args, dest) for dest, dotted in dests.items()
                            if getattr(args, dest) is not None})


def build(cls, args: argparse.Namespace, dests: dict[str, str]):
    """An instance of dataclass ``cls`` from its flags (absent ones take the field's default);
    errors name the flag."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, flag_of(f), None)
        if value is not None:
            kwargs[f.name] = coerce(value, hints[f.name], f"--{flag_of(f)}")
    return cls(**kwargs)


