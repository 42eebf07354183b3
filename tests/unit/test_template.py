"""The template language: parsing, piece-wise ids, prompt plans, truncation, errors."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ptuning_dist.data.tokenizer import PieceTokenizer
from ptuning_dist.errors import TemplateError
from ptuning_dist.prompt.template import Template, parse


@pytest.fixture(scope="module")
def sp(family_dirs):
    return PieceTokenizer(AutoTokenizer.from_pretrained(family_dirs["llama"]))


def test_parse_parts_slots_and_implicit_target():
    parts = parse("[P*3] {sub_label} [P] capital [P*2]")
    assert [(p.kind, p.value, p.count, p.first_slot) for p in parts] == [
        ("prompt", "", 3, 0), ("field", "sub_label", 0, 0), ("prompt", "", 1, 3), ("text", "capital", 0, 0),
        ("prompt", "", 2, 4), ("mask", "", 0, 0)]
    assert Template("[P*3] {sub_label} [P] capital [P*2]").n_prompt == 6
    # text after [MASK] is invisible to a causal LM and dropped; dotted fields reach nested JSON
    t = Template("{target.span1_text} is [MASK] . trailing words")
    assert [p.kind for p in t.parts] == ["field", "text", "mask"] and t.fields == ("target.span1_text",)


def test_ids_built_piecewise_with_plan(word_piece):
    t = Template("[P*2] The capital of {sub_label} [P] is [MASK] .")
    enc = t.encode({"sub_label": "France"}, "Paris", word_piece, 64, "row")
    words = ["The", "capital", "of", "France"]
    expect = [word_piece.pad_id] * 2 + [word_piece.hf.convert_tokens_to_ids(w) for w in words] + [word_piece.pad_id] + \
        [word_piece.hf.convert_tokens_to_ids("is")]
    assert list(enc.ids) == expect
    assert enc.prompt_pos == (0, 1, 6) and enc.prompt_slot == (0, 1, 2)
    assert enc.target_id == word_piece.hf.convert_tokens_to_ids("Paris") and enc.target_pos == len(expect) - 1
    assert all(enc.ids[p] == word_piece.pad_id for p in enc.prompt_pos)


def test_spaces_follow_the_template_for_byte_level_bpe(bpe_piece):
    enc = Template("[P] {sub_label} capital [MASK]").encode({"sub_label": "France"}, "the", bpe_piece, 64, "r")
    body = bpe_piece.hf.convert_ids_to_tokens(list(enc.ids[1:]))
    assert body[0].startswith("Ġ") and body[-1] == "Ġcapital"  # preceded by spaces in the template
    assert bpe_piece.decode([enc.target_id]) == " the"  # the target too: it follows a space
    glued = Template("[P] {sub_label}? [MASK]").encode({"sub_label": "France"}, "the", bpe_piece, 64, "r")
    assert bpe_piece.hf.convert_ids_to_tokens(list(glued.ids))[-1] == "?"  # no space before '?'
    first = Template("{sub_label} [P] [MASK]").encode({"sub_label": "France"}, "the", bpe_piece, 64, "r")
    assert not bpe_piece.hf.convert_ids_to_tokens(list(first.ids))[0].startswith("Ġ")  # nothing before it


def test_bos_is_prepended_for_sentencepiece(sp):
    enc = Template("[P*2] {a} [MASK]").encode({"a": "the"}, "the", sp, 32, "r")
    assert enc.ids[0] == sp.bos_id == 1 and enc.prompt_pos == (1, 2)


def test_truncation_cuts_only_the_longest_field(word_piece):
    t = Template("{premise} Question: {hypothesis} ? [P*3] Answer: [MASK] .")
    long, short = " ".join(["France"] * 40), "Paris is"
    full = t.encode({"premise": long, "hypothesis": short}, "yes", word_piece, 512, "r")
    cut = t.encode({"premise": long, "hypothesis": short}, "yes", word_piece, 20, "r")
    assert len(cut.ids) == 20 and cut.truncated == len(full.ids) - 20
    # anchors, the other field and every prompt slot survive; the cut is at the premise's end
    tail = len(full.ids) - 40  # everything after the 40-token premise
    assert cut.ids[-tail:] == full.ids[-tail:] and len(cut.prompt_pos) == 3
    assert cut.ids[: 20 - tail] == full.ids[: 20 - tail]
    both = t.encode({"premise": long, "hypothesis": long}, "yes", word_piece, 30, "r")
    assert len(both.ids) == 30  # both long: cut alternately, never below one token each


@pytest.mark.parametrize("text,needle", [
    ("", "empty template"),
    ("{premise} [MASK] [MASK]", "2 [MASK] targets"),
    ("[P*0] {x}", "at least one slot"),
    ("{x} [P*2 ]", "cannot parse"),
    ("{x} {bad-name}", "bad field name {bad-name}"),
    ("[MASK] {x}", "nothing precedes the target"),
])
def test_template_errors_name_the_template(text, needle):
    with pytest.raises(TemplateError, match=None) as e:
        Template(text)
    assert needle in str(e.value) and (repr(text) in str(e.value) or text == "")


def test_row_errors_name_the_row(word_piece, bpe_piece):
    with pytest.raises(TemplateError, match=r"unknown field\(s\) \['nope'\]"):
        Template("[P] {nope}", fields=("sub_label",))
    t = Template("[P*2] {sub_label} [MASK]")
    with pytest.raises(TemplateError, match="data.jsonl:7: row has no field 'sub_label'"):
        t.encode({}, "Paris", word_piece, 32, "data.jsonl:7")
    with pytest.raises(TemplateError, match=r"data.jsonl:8: target 'New Delhi' is 2 tokens"):
        t.encode({"sub_label": "India"}, "New Delhi", word_piece, 32, "data.jsonl:8")
    with pytest.raises(TemplateError, match="data.jsonl:9: .*more than max_seq_len"):
        Template("[P*20] {sub_label} [MASK]").encode({"sub_label": "x"}, "Paris", word_piece, 16, "data.jsonl:9")
    assert Template("{premise} [P*3] Answer: [MASK]").without_prompts().text == "{premise} Answer: [MASK]"
