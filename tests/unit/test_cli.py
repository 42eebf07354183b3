"""The entry points: flags generated from the config dataclasses, --help that explains each one, the
console scripts, and the rooms' promises (planning imports no torch; test knobs live in debug.py)."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing

import pytest
from distutil import BIN, ROOT

from ptuning_dist.cli import evaluate as cli_evaluate
from ptuning_dist.cli import predict as cli_predict
from ptuning_dist.cli import export as cli_export
from ptuning_dist.cli import plan as cli_plan
from ptuning_dist.cli import train as cli_train
from ptuning_dist.cli.args import add_fields, build, flag_of
from ptuning_dist.config import SECTIONS, RunConfig, choices, field_docs, literal_choices
from ptuning_dist.errors import ConfigError


def flags_of(parser) -> dict[str, str]:
    """--flag -> its help text, for every visible option of an argparse parser."""
    return {a.option_strings[0]: a.help for a in parser._actions
            if a.option_strings and a.help != "==SUPPRESS==" and a.dest != "help"}


def test_every_run_config_field_is_a_flag_whose_help_is_its_docstring():
    parser, dests = cli_train.parser()
    helps = flags_of(parser)
    assert set(dests.values()) == {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text = helps[f"--{flag_of(f)}"]
            doc = field_docs(cls)[f.name]
            assert len(doc) > 20 and text.startswith(doc.replace("%", "%%")), (f.name, text)
            assert f"default: {f.default}" in text and f"config: {section}.{f.name}" in text, text
            if (allowed := literal_choices(hints[f.name])) is not None:
                assert "one of " + ", ".join(map(str, allowed[:-1])) in text, text
    assert "--model" in helps and "config: model.path" in helps["--model"]  # a field named otherwise on the CLI


@pytest.mark.parametrize("module", [cli_train, cli_evaluate, cli_export, cli_plan, cli_predict])
def test_help_explains_every_flag(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    options = re.findall(r"^  (--[a-z0-9_-]+)", out, flags=re.M)
    assert len(options) >= {cli_train: 36, cli_evaluate: 14, cli_export: 2, cli_plan: 16, cli_predict: 20}[module], out
    for opt in options:
        block = re.search(rf"^  {re.escape(opt)}(?=[ \n])(.*?)(?=^  -|\Z)", out, flags=re.M | re.S).group(1)
        words = block.split()[1:]  # the metavar, then the explanation
        assert len(words) >= 4 and words[0] != "sets", (opt, block)


def test_values_are_parsed_by_the_config_and_errors_name_the_field():
    cfg = cli_train.parse(["--lr", "1e-3", "--fsdp2", "--activation_checkpointing", "false", "--relations", "P36,P37",
                           "--host_malloc", "trim"])
    assert (cfg.train.lr, cfg.parallel.fsdp2, cfg.parallel.activation_checkpointing) == (1e-3, True, False)
    assert cfg.data.relations == ["P36", "P37"] and cfg.parallel.host_malloc == "trim"
    assert cli_train.parse([]).to_dict() == RunConfig().to_dict()  # no flag: the config's defaults
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        cli_train.parse(["--lr", "fast"])
    with pytest.raises(ConfigError, match="model.backend: 'tpu' is not hf or megatron"):
        cli_train.parse(["--backend", "tpu"])
    with pytest.raises(ConfigError, match="data.task: 'squad' is not default, lama, rte, cb, boolq, wic, copa, wsc, multirc or record"):
        cli_train.parse(["--task", "squad"])


def test_a_dataclass_of_flags_builds_with_its_defaults_and_names_the_flag_in_errors():
    import argparse

    p = argparse.ArgumentParser()
    own = add_fields(p, cli_plan.PlanArgs)
    args = build(cli_plan.PlanArgs, p.parse_args(["--model", "gpt2-xl", "--gpus_per_node", "4", "--zero_stage", "3"]), own)
    assert (args.model, args.gpus_per_node, args.zero_stage, args.encoder) == ("gpt2-xl", 4, 3, "lstm")
    with pytest.raises(ConfigError, match="--zero_stage: 5 is not 0, 1, 2 or 3"):
        build(cli_plan.PlanArgs, p.parse_args(["--model", "x", "--zero_stage", "5"]), own)
    with pytest.raises(ConfigError, match="--tp: expected an integer, got 'two'"):
        build(cli_plan.PlanArgs, p.parse_args(["--model", "x", "--tp", "two"]), own)
    assert choices(typing.get_type_hints(cli_plan.PlanArgs)["encoder"]) == ("lstm", "mlp", "embedding")


def test_plan_flag_errors_are_one_line_and_exit_2(capsys):
    assert cli_plan.main(["--model", "gpt2-xl", "--tp", "two"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --tp: expected an integer, got 'two'\n"


def test_convert_flag_errors_are_one_line_and_exit_2(capsys, tmp_path):
    from ptuning_dist.cli import convert as cli_convert

    assert cli_convert.main(["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--tp", "0"]) == 2
    assert capsys.readouterr().err == "error: --tp must be >= 1, not 0\n"
    assert cli_convert.main(["--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.path: ") and "no config.json" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["ptuning-train", "ptuning-evaluate", "ptuning-export", "ptuning-plan",
                                  "ptuning-convert", "ptuning-predict"])
def test_console_scripts(name):
    p = subprocess.run([str(BIN / name), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith(f"usage: {name}"), p.stderr[-2000:]


def test_planning_and_the_plan_cli_import_no_torch():
    code = ("import sys, ptuning_dist.planning, ptuning_dist.planning.planner, ptuning_dist.cli.plan, "
            "ptuning_dist.backbone.families; print(sorted(m for m in ('torch', 'megatron', 'deepspeed', "
            "'transformers') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]", p.stdout
    p = subprocess.run([sys.executable, str(ROOT / "launchers" / "plan.py"), "--help"], capture_output=True,
                       text=True, check=True)
    assert "--gpus-per-node" in p.stdout


def test_test_knobs_are_read_in_debug_py_only():
    """Environment variables that change what production code does are read in ptuning_dist/debug.py
    (test and measurement knobs) or, for the one real knob, compat/build_lock.py."""
    readers = set()
    for path in (ROOT / "ptuning_dist").rglob("*"):
        if path.suffix in (".py", ".cpp") and re.search(r"(environ|getenv)\W+[^\n]*PTUNING_", path.read_text()):
            readers.add(path.relative_to(ROOT).as_posix())
    assert readers == {"ptuning_dist/debug.py", "ptuning_dist/compat/build_lock.py"}, readers
