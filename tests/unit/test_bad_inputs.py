"""Every bad input is one ``error: ...`` line naming the field, file or line, exit 2, no traceback and
nothing written: a table of cases across flags, run configs, DeepSpeed JSON, templates, data, model
directories, tokenizers, checkpoints, prompt tables and the arguments of every entry point.

Each case runs the entry point's ``main`` in this process (what the console script and the launcher
call); an exception that escapes it (a traceback for the user) fails the case."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from ptuning_dist.backbone.tiny import default_backbone
from ptuning_dist.cli import convert, evaluate, export, plan, predict
from ptuning_dist.cli import train as train_cli

BUNDLED = Path(__file__).resolve().parents[2] / "ptuning_dist" / "data" / "bundled" / "lama_tiny"
MAINS = {"train": train_cli.main, "evaluate": evaluate.main, "export": export.main, "predict": predict.main,
         "plan": plan.main, "convert": convert.main}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny model and one short trained run (its table and checkpoint), shared by the cases."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = default_backbone(root / "model")
    run_dir = root / "run"
    assert train_cli.main(["--model", str(model), "--output_dir", str(run_dir), "--max_steps", "2",
                           "--micro_batch_size", "4", "--log_every", "1"]) == 0
    return {"model": model, "run": run_dir}


@dataclass
class Ctx:
    tmp: Path
    model: Path
    run: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def copy_model(self, edit) -> str:
        d = self.tmp / "model"
        shutil.copytree(self.model, d)
        edit(d)
        return str(d)

    def copy_data(self, edit) -> str:
        d = self.tmp / "data"
        shutil.copytree(BUNDLED, d)
        edit(d)
        return str(d)

    def file(self, name: str, content) -> str:
        p = self.tmp / name
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
        return str(p)

    def ckpt(self, edit) -> str:
        src = sorted((self.run / "checkpoints").iterdir())[-1]
        d = self.tmp / "ckpt" / src.name
        shutil.copytree(src, d)
        edit(d)
        return str(d)

    def run_copy(self, edit) -> str:
        d = self.tmp / "run"
        shutil.copytree(self.run, d, ignore=shutil.ignore_patterns("checkpoints"))
        edit(d)
        return str(d)

    def table(self, edit) -> str:
        d = self.tmp / "table"
        shutil.copytree(self.run / "prompt_table", d)
        edit(d)
        return str(d)

    def train(self, *flags) -> list[str]:
        return ["--model", str(self.model), "--output_dir", str(self.out), "--max_steps", "2",
                "--micro_batch_size", "4", *map(str, flags)]


def _json_edit(name: str, **changes):
    def edit(d: Path):
        meta = json.loads((d / name).read_text())
        meta.update(changes)
        (d / name).write_text(json.dumps(meta))
    return edit


def _truncate(name: str, keep: int):
    def edit(d: Path):
        (d / name).write_bytes((d / name).read_bytes()[:keep])
    return edit


def _write(name: str, content):
    def edit(d: Path):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def _retokenize(d: Path):  # a tokenizer with more ids than config.json's vocab_size
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] -= 5
    (d / "config.json").write_text(json.dumps(cfg))


def _old_format(d: Path):  # a checkpoint as versions before 0.16 wrote it
    (d / "state.json").unlink()
    (d / "state.safetensors").unlink()
    (d / "state.pt").write_bytes(b"\x80\x04N.")


LAMA_ROW = '{"sub_label": "France", "obj_label": "Paris", "predicate_id": "P36"}\n'

# (id, entry point, argv(ctx), what the error line must say)
CASES = [
    # ---- flags and values ---------------------------------------------------------------------
    ("lr_inf", "train", lambda c: c.train("--lr", "inf"), "train.lr: must be a finite number"),
    ("lr_nan", "train", lambda c: c.train("--lr", "nan"), "train.lr: must be a finite number"),
    ("lr_negative", "train", lambda c: c.train("--lr", "-1"), "train.lr: must be > 0"),
    ("lr_word", "train", lambda c: c.train("--lr", "fast"), "train.lr: expected a number"),
    ("grad_norm_negative", "train", lambda c: c.train("--max_grad_norm", "-1"), "train.max_grad_norm: must be >= 0"),
    ("weight_decay_negative", "train", lambda c: c.train("--weight_decay", "-0.1"), "train.weight_decay"),
    ("max_steps_zero", "train", lambda c: c.train("--max_steps", "0"), "train.max_steps: must be >= 1"),
    ("max_steps_fraction", "train", lambda c: c.train("--max_steps", "1.5"), "train.max_steps: expected an integer"),
    ("max_steps_bool_flag", "train", lambda c: c.train("--max_steps", "true"), "train.max_steps: expected an integer"),
    ("steps_and_epochs", "train", lambda c: c.train("--epochs", "1"), "train.max_steps/epochs"),
    ("epochs_zero", "train", lambda c: ["--model", str(c.model), "--output_dir", str(c.out), "--epochs", "0"],
     "train.epochs"),
    ("micro_batch_zero", "train", lambda c: c.train("--micro_batch_size", "0"), "train.micro_batch_size: must be >= 1"),
    ("eval_batch_zero", "train", lambda c: c.train("--eval_batch_size", "0"), "train.eval_batch_size"),
    ("patience_negative", "train", lambda c: c.train("--patience", "-1"), "train.patience"),
    ("global_batch_indivisible", "train", lambda c: c.train("--global_batch_size", "6"), "global_batch_size"),
    ("bool_flag_word", "train", lambda c: c.train("--select_best", "yes"), "train.select_best: expected true or false"),
    ("encoder_choice", "train", lambda c: c.train("--encoder", "gru"), "prompt.encoder: 'gru' is not"),
    ("dtype_choice", "train", lambda c: c.train("--dtype", "int8"), "model.dtype: 'int8' is not"),
    ("lstm_dropout_one", "train", lambda c: c.train("--lstm_dropout", "1.0"), "prompt.lstm_dropout"),
    ("timeout_zero", "train", lambda c: c.train("--dist_timeout_s", "0"), "parallel.dist_timeout_s"),
    ("tp_word", "train", lambda c: c.train("--tp", "two"), "parallel.tp: expected an integer"),
    ("tp_world", "train", lambda c: c.train("--tp", "2", "--backend", "megatron"), "does not divide the world size 1"),
    ("packing_word", "train", lambda c: c.train("--packing", "sometimes"), "data.packing"),
    ("unknown_flag", "train", lambda c: c.train("--learning_rate", "1"), "unrecognized arguments: --learning_rate"),
    ("empty_template", "train", lambda c: c.train("--template", ""), "prompt.template: may not be empty"),
    ("blank_template", "train", lambda c: c.train("--template", "   "), "prompt.template: may not be empty"),
    ("template_two_masks", "train", lambda c: c.train("--template", "[P*3] {sub_label} [MASK] [MASK]"),
     "2 [MASK] targets, expected one"),
    ("template_bad_slot", "train", lambda c: c.train("--template", "[P*x] {sub_label} [MASK]"), "cannot parse"),
    ("template_unknown_field", "train", lambda c: c.train("--template", "[P*3] {subject} [MASK] ."), "subject"),
    ("empty_output_dir", "train", lambda c: ["--model", str(c.model), "--output_dir", ""], "train.output_dir: may not be empty"),
    ("output_dir_is_a_file", "train", lambda c: ["--model", str(c.model), "--output_dir", c.file("f", "x")],
     "train.output_dir"),
    ("relations_empty", "train", lambda c: c.train("--relations", ","), "data.relations: expected non-empty strings"),
    ("relation_unknown", "train", lambda c: c.train("--relations", "P99"), "data.relations: ['P99']"),
    ("task_unknown", "train", lambda c: c.train("--task", "squad"), "data.task: 'squad' is not"),
    ("task_twice", "train", lambda c: c.train("--task", "rte,rte"), "data.task: a task is named twice"),
    ("max_seq_len_tiny", "train", lambda c: c.train("--max_seq_len", "4"), "data.max_seq_len: must be >= 8"),
    ("max_seq_len_past_positions", "train", lambda c: c.train("--max_seq_len", "100000"),
     "data.max_seq_len = 100000 exceeds the 512 positions of"),
    ("allowed_vocab_missing", "train", lambda c: c.train("--allowed_vocab", str(c.tmp / "nope.txt")),
     "data.allowed_vocab: file not found"),
    ("allowed_vocab_not_utf8", "train", lambda c: c.train("--allowed_vocab", c.file("v.txt", b"\xff\xfe\x00")),
     "data.allowed_vocab"),
    # ---- run config files -------------------------------------------------------------------
    ("yaml_bool_as_int", "train", lambda c: ["--model", str(c.model), "--output_dir", str(c.out), "--config",
                                            c.file("c.yaml", "train:\n  max_steps: true\n")],
     "train.max_steps: expected an integer, got True"),
    ("yaml_int_as_bool", "train", lambda c: c.train("--config", c.file("c.yaml", "train:\n  select_best: 1\n")),
     "train.select_best: expected true or false, got 1"),
    ("yaml_number_as_string", "train", lambda c: c.train("--config", c.file("c.yaml", "prompt:\n  template: 5\n")),
     "prompt.template: expected a string, got 5"),
    ("yaml_unknown_field", "train", lambda c: c.train("--config", c.file("c.yaml", "train:\n  lrr: 1\n")),
     "train.lrr: unknown field"),
    ("yaml_unknown_section", "train", lambda c: c.train("--config", c.file("c.yaml", "optim:\n  lr: 1\n")),
     "optim: unknown config section"),
    ("yaml_list", "train", lambda c: c.train("--config", c.file("c.yaml", "- 1\n- 2\n")), "expected a mapping"),
    ("yaml_unparsable", "train", lambda c: c.train("--config", c.file("c.yaml", "train: [1,\n")), "cannot parse"),
    ("json_config_not_utf8", "train", lambda c: c.train("--config", c.file("c.json", b"\xff{}")), "--config"),
    ("config_missing", "train", lambda c: c.train("--config", str(c.tmp / "none.yaml")), "--config: file not found"),
    # ---- DeepSpeed JSON -----------------------------------------------------------------------
    ("ds_missing", "train", lambda c: c.train("--ds_config", str(c.tmp / "none.json")), "file not found"),
    ("ds_not_json", "train", lambda c: c.train("--ds_config", c.file("ds.json", "{zero")), "not valid JSON"),
    ("ds_list", "train", lambda c: c.train("--ds_config", c.file("ds.json", "[1]")), "expected a JSON object"),
    ("ds_stage", "train", lambda c: c.train("--ds_config", c.file("ds.json", '{"zero_optimization": {"stage": 7}}')),
     "stage"),
    ("ds_micro_contradicts", "train",
     lambda c: c.train("--ds_config", c.file("ds.json", '{"train_micro_batch_size_per_gpu": 8}')),
     "train_micro_batch_size_per_gpu"),
    # ---- data -------------------------------------------------------------------------------
    ("data_dir_missing", "train", lambda c: c.train("--task", "lama", "--data_dir", str(c.tmp / "none")), "not found"),
    ("blank_split", "train", lambda c: c.train("--task", "lama", "--data_dir", c.copy_data(_write("P36/train.jsonl", "\n\n"))),
     "P36/train.jsonl: no rows"),
    ("not_utf8_row", "train", lambda c: c.train("--task", "lama", "--data_dir",
                                                c.copy_data(_write("P36/train.jsonl", LAMA_ROW.encode() + b"\xff\n"))),
     "P36/train.jsonl:2: not UTF-8"),
    ("bad_json_row", "train", lambda c: c.train("--task", "lama", "--data_dir",
                                                c.copy_data(_write("P36/train.jsonl", LAMA_ROW + "{oops\n"))),
     "P36/train.jsonl:2: not valid JSON"),
    ("row_not_object", "train", lambda c: c.train("--task", "lama", "--data_dir",
                                                  c.copy_data(_write("P36/train.jsonl", "[1, 2]\n"))),
     "P36/train.jsonl:1: expected a JSON object"),
    ("null_object", "train", lambda c: c.train("--task", "lama", "--data_dir", c.copy_data(_write(
        "P36/train.jsonl", '{"sub_label": "France", "obj_label": null}\n'))), "P36/train.jsonl:1: obj_label"),
    ("null_subject", "train", lambda c: c.train("--task", "lama", "--data_dir", c.copy_data(_write(
        "P36/train.jsonl", '{"sub_label": null, "obj_label": "Paris"}\n'))), "P36/train.jsonl:1: field 'sub_label'"),
    ("unknown_object", "train", lambda c: c.train("--task", "lama", "--allowed_vocab", "full", "--data_dir", c.copy_data(
        _write("P36/train.jsonl", '{"sub_label": "France", "obj_label": "Zyxwvutsrq"}\n'))),
     "P36/train.jsonl:1: target 'Zyxwvutsrq' is not in the tokenizer's vocabulary"),
    ("relation_template", "train", lambda c: c.train("--task", "lama", "--data_dir", c.copy_data(_write(
        "relations.jsonl", '{"relation": "P36", "template": "[X] is nice"}\n'))), "needs [X] and [Y]"),
    # ---- model directories and tokenizers -------------------------------------------------------
    ("model_missing", "train", lambda c: ["--model", str(c.tmp / "none"), "--output_dir", str(c.out)], "model.path"),
    ("config_json_broken", "train", lambda c: ["--model", c.copy_model(_write("config.json", "{nope")),
                                              "--output_dir", str(c.out)], "config.json"),
    ("weights_truncated", "train", lambda c: ["--model", c.copy_model(_truncate("model.safetensors", 5000)),
                                             "--output_dir", str(c.out)], "model.safetensors: truncated"),
    ("weights_garbage", "train", lambda c: ["--model", c.copy_model(_write("model.safetensors", b"\x00" * 3)),
                                           "--output_dir", str(c.out)], "model.safetensors: not a safetensors file"),
    ("tokenizer_broken", "train", lambda c: ["--model", c.copy_model(_write("tokenizer.json", "{")),
                                            "--output_dir", str(c.out)], "cannot load the tokenizer"),
    ("tokenizer_past_vocab", "train", lambda c: ["--model", c.copy_model(_retokenize), "--output_dir", str(c.out)],
     "more than"),
    # ---- checkpoints ------------------------------------------------------------------------
    ("resume_missing", "train", lambda c: c.train("--resume", str(c.tmp / "none")), "missing meta.json"),
    ("resume_pickle", "train", lambda c: c.train("--resume", c.ckpt(_old_format)), "a pickled state.pt"),
    ("resume_meta_broken", "train", lambda c: c.train("--resume", c.ckpt(_write("meta.json", "{"))), "not valid JSON"),
    ("resume_meta_bool_step", "train", lambda c: c.train("--resume", c.ckpt(_json_edit("meta.json", step=True))),
     "not a ptuning_dist.checkpoint/2 record"),
    ("resume_tensors_corrupt", "train", lambda c: c.train("--resume", c.ckpt(_truncate("state.safetensors", 100))),
     "SHA-256 does not match"),
    ("resume_past_max_steps", "train", lambda c: c.train("--resume", c.ckpt(lambda d: None), "--max_steps", "1"),
     "past train.max_steps 1"),
    ("resume_other_encoder", "train", lambda c: c.train("--resume", c.ckpt(lambda d: None), "--encoder", "mlp"),
     "does not fit this run's"),
    # ---- evaluate / export / predict --------------------------------------------------------------
    ("eval_neither", "evaluate", lambda c: ["--model", str(c.model)], "give exactly one of"),
    ("eval_table_missing", "evaluate", lambda c: ["--model", str(c.model), "--prompt_table", str(c.tmp / "none")],
     "prompt table"),
    ("eval_table_bool_rows", "evaluate", lambda c: ["--model", str(c.model), "--prompt_table",
                                                    c.table(_json_edit("prompt_table.json", n_prompt=True))],
     "field 'n_prompt' must be a int"),
    ("eval_table_truncated", "evaluate", lambda c: ["--model", str(c.model), "--prompt_table",
                                                    c.table(_truncate("prompt_table.safetensors", 20))], "cannot read"),
    ("eval_table_other_tokenizer", "evaluate", lambda c: [
        "--model", str(c.model), "--out", str(c.tmp / "eval.json"), "--prompt_table", c.table(_json_edit(
            "prompt_table.json", backbone={**json.loads((c.run / "prompt_table" / "prompt_table.json").read_text())[
                "backbone"], "tokenizer": "0" * 64}))], "trained with the tokenizer of"),
    ("export_run_missing", "export", lambda c: ["--run_dir", str(c.tmp / "none"), "--out", str(c.tmp / "t")],
     "run_config.json"),
    ("export_run_config_broken", "export", lambda c: ["--run_dir", c.run_copy(_write("run_config.json", "{")),
                                                      "--out", str(c.tmp / "t")], "run_config.json"),
    ("export_run_config_bool", "export", lambda c: ["--run_dir", c.run_copy(_json_edit(
        "run_config.json", train={"max_steps": False})), "--out", str(c.tmp / "t")], "train.max_steps"),
    ("export_encoder_truncated", "export", lambda c: ["--run_dir", c.run_copy(_truncate("encoder.safetensors", 30)),
                                                      "--out", str(c.tmp / "t")], "encoder.safetensors"),
    ("relations_file_missing", "train", lambda c: c.train("--task", "lama", "--data_dir", c.copy_data(
        lambda d: (d / "relations.jsonl").unlink())), "relations.jsonl"),
    ("predict_input_missing", "predict", lambda c: ["--prompt_table", str(c.run / "prompt_table"), "--model",
                                                    str(c.model), "--input", str(c.tmp / "none.jsonl"),
                                                    "--out", str(c.tmp / "p.jsonl")], "not found"),
    ("predict_input_not_utf8", "predict", lambda c: ["--prompt_table", str(c.run / "prompt_table"), "--model",
                                                     str(c.model), "--input", c.file("in.jsonl", b"\xff\xfe\n"),
                                                     "--out", str(c.tmp / "p.jsonl")], "in.jsonl:1: not UTF-8"),
    ("predict_top_k_zero", "predict", lambda c: ["--prompt_table", str(c.run / "prompt_table"), "--model", str(c.model),
                                                 "--input", c.file("in.jsonl", LAMA_ROW), "--out",
                                                 str(c.tmp / "p.jsonl"), "--top_k", "0"], "--top_k: must be >= 1"),
    ("predict_out_dir_missing", "predict", lambda c: ["--prompt_table", str(c.run / "prompt_table"), "--model",
                                                      str(c.model), "--input", c.file("in.jsonl", LAMA_ROW),
                                                      "--out", str(c.tmp / "no" / "p.jsonl")], "does not exist"),
    # ---- the planner and the converter ------------------------------------------------------------
    ("plan_model_unknown", "plan", lambda c: ["--model", "gpt-9"], "neither a preset"),
    ("plan_tp_word", "plan", lambda c: ["--model", str(c.model), "--tp", "x"], "--tp: expected an integer"),
    ("plan_tp_indivisible", "plan", lambda c: ["--model", str(c.model), "--nodes", "1", "--gpus-per-node", "8",
                                               "--tp", "3"], "does not divide"),
    ("plan_memory_negative", "plan", lambda c: ["--model", str(c.model), "--gpu_mem_gb", "-1"], "--gpu_mem_gb"),
    ("plan_config_broken", "plan", lambda c: ["--model", c.copy_model(_write("config.json", "{"))], "not valid JSON"),
    ("convert_model_missing", "convert", lambda c: ["--model", str(c.tmp / "none"), "--out", str(c.tmp / "o")],
     "none"),
    ("convert_tp_zero", "convert", lambda c: ["--model", str(c.model), "--out", str(c.tmp / "o"), "--tp", "0"], "tp"),
]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name,entry,argv,says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(made, tmp_path, capsys, name, entry, argv, says):
    ctx = Ctx(tmp_path, made["model"], made["run"])
    args = argv(ctx)
    before, run_before = snapshot(tmp_path), snapshot(made["run"])
    try:
        rc = MAINS[entry](args)
    except SystemExit as e:  # argparse's error(): our Parser prints one line and exits 2
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert rc == 2, f"exit {rc}; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert says in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before, f"written: {sorted(snapshot(tmp_path) - before)}"
    assert snapshot(made["run"]) == run_before


def test_the_table_is_large_enough():
    assert len(CASES) >= 60
