"""Tasks on the real FewGLUE files and the bundled LAMA set; candidates; sampling; collation."""
from __future__ import annotations

import json

import pytest
from ptuning_dist.data.collate import Example, SampleStream, build_candidates, collate, encode_rows
from ptuning_dist.data.tasks import LamaTask, build_task
from ptuning_dist.errors import DataError, TemplateError
from ptuning_dist.prompt.template import Template

from shared_data import FEWGLUE


EXPECTED = {"rte": (32, 32, 277), "cb": (32, 32, 56), "boolq": (32, 32, 3270), "wic": (32, 32, 638)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fewglue_loads_and_tokenizes(name, bpe_piece):
    task = build_task(name, FEWGLUE / {"rte": "RTE", "cb": "CB", "boolq": "BoolQ", "wic": "WiC"}[name])
    counts = tuple(len(task.rows(s)) for s in ("train", "dev32", "val"))
    assert counts == EXPECTED[name]
    t = Template(task.default_template, fields=task.fields)
    cands = build_candidates(task, bpe_piece, None)
    assert cands.names == list(task.verbalizer) and len(set(cands.ids)) == len(cands.ids)
    ex = encode_rows(task.rows("val")[:300], lambda r: t, bpe_piece, 256, cands)
    assert all(len(e.enc.ids) <= 256 and len(e.enc.prompt_pos) == t.n_prompt for e in ex)
    assert {e.label for e in ex} <= set(range(len(cands.ids)))
    if name == "boolq":
        assert any(e.enc.truncated > 0 for e in ex)  # long passages are cut, slots kept


def test_default_task_loads_from_the_package(word_piece):
    task = build_task("default")
    assert task.relations == ["P36", "P37"] and len(task.rows("train")) == 48
    assert task.manual_template("P36") == "The capital of {sub_label} is [MASK] ."
    cands = build_candidates(task, word_piece, None)  # the default task scores all objects
    objects = {r.target for s in ("train", "dev", "test") for r in task.rows(s)}
    assert len(cands.ids) == len(objects)
    assert build_candidates(task, word_piece, "full").ids is None


def test_allowed_vocab_files(word_piece, tmp_path):
    task = build_task("default")
    (tmp_path / "v.json").write_text(json.dumps(["Paris", "Rome", "New Delhi", "Berlin"]))
    (tmp_path / "v.txt").write_text("Paris\nRome\nBerlin\n")
    a = build_candidates(task, word_piece, str(tmp_path / "v.json"))
    b = build_candidates(task, word_piece, str(tmp_path / "v.txt"))
    assert a.ids == b.ids and len(a.ids) == 3  # 'New Delhi' is two tokens: left out
    row = [r for r in task.rows("train") if r.target not in ("Paris", "Rome", "Berlin")][0]
    with pytest.raises(TemplateError, match=f"{row.where}: target .* not in the allowed vocabulary"):
        encode_rows([row], lambda r: Template("[P] {sub_label} [MASK]"), word_piece, 32, a)
    with pytest.raises(DataError, match="data.allowed_vocab: file not found"):
        build_candidates(task, word_piece, str(tmp_path / "nope.txt"))


def test_bad_data_errors_name_file_and_line(tmp_path):
    (tmp_path / "relations.jsonl").write_text('{"relation": "P1", "template": "[X] is in [Y] ."}\n')
    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "train.jsonl").write_text('{"sub_label": "a", "obj_label": "b"}\n{not json}\n')
    task = LamaTask(tmp_path)
    with pytest.raises(DataError, match=r"P1/train.jsonl:2: not valid JSON"):
        task.rows("train")
    (tmp_path / "P1" / "train.jsonl").write_text('{"sub_label": "a"}\n')
    with pytest.raises(DataError, match=r"P1/train.jsonl:1: row has no field 'obj_label'"):
        task.rows("train")
    with pytest.raises(DataError, match="data file not found"):
        task.rows("dev")
    with pytest.raises(DataError, match=r"data.relations: \['P9'\] not in"):
        LamaTask(tmp_path, ["P9"])
    (tmp_path / "relations.jsonl").write_text('{"relation": "P1", "template": "no slots"}\n')
    with pytest.raises(DataError, match="relations.jsonl:1: template 'no slots' needs"):
        LamaTask(tmp_path)
    rte = tmp_path / "rte"
    rte.mkdir()
    (rte / "train.jsonl").write_text('{"premise": "p", "hypothesis": "h", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:1: label 'maybe' not in the verbalizer"):
        build_task("rte", rte).rows("train")
    with pytest.raises(DataError, match="unknown task 'squad'"):
        build_task("squad")


def test_sample_stream_is_deterministic_permutations():
    a, b = SampleStream(10, seed=1), SampleStream(10, seed=1)
    first = a.take(25)
    assert first == b.take(25)
    assert sorted(first[:10]) == sorted(first[10:20]) == list(range(10)) and first[:10] != first[10:20]
    assert SampleStream(10, seed=2).take(10) != first[:10]
    c = SampleStream(10, seed=1)
    c.consumed = 13  # resume mid-epoch
    assert c.take(12) == first[13:25]


def test_collate_pads_dynamically(word_piece):
    t = Template("[P] {sub_label} [P*2] [MASK]")
    rows = [t.encode({"sub_label": s}, "Paris", word_piece, 32, "r") for s in ("France", "France France France")]
    b = collate([Example(e, 3, "P36") for e in rows], word_piece.pad_id)
    assert b.ids_BS.shape == (2, 6) and b.attention_mask_BS.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert b.target_pos_E.tolist() == [3, 5] and b.n_tokens == 10
    assert list(zip(b.prompt_rows_N.tolist(), b.prompt_pos_N.tolist(), b.prompt_slots_N.tolist())) == [
        (0, 0, 0), (0, 2, 1), (0, 3, 2), (1, 0, 0), (1, 4, 1), (1, 5, 2)]
