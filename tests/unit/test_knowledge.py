"""The embedded default's facts and probe (backbone/knowledge.py); the LM itself is built and
P-tuned by the default job (tests/e2e/test_launchers.py)."""
from __future__ import annotations

import re

from ptuning_dist.backbone import knowledge as k
from ptuning_dist.data.tasks import LamaTask


def test_facts_are_deterministic_single_words():
    a, b = k.facts(), k.facts()
    assert a == b and {r: len(p) for r, p in a.items()} == {"P36": 161, "P30": 161, "P38": 161, "P17": 150}
    assert dict(a["P36"])["France"] == "Paris" and dict(a["P30"])["Japan"] == "Asia"
    assert dict(a["P38"])["Germany"] == "Euro"
    for pairs in a.values():
        assert all(re.fullmatch(r"\w+", w) for s, o in pairs for w in (s, o))


def test_probe_layout_and_splits(tmp_path):
    fs = k.facts()
    k.write_lama(tmp_path / "probe", fs)
    task = LamaTask(tmp_path / "probe")
    assert task.relations == ["P17", "P30", "P36", "P38"]
    n = {s: len(task.rows(s)) for s in ("train", "dev", "test")}
    assert sum(n.values()) == sum(map(len, fs.values())) and n["train"] > n["dev"] > 0 and n["test"] > 0
    by_split = {s: {(r.group, r.values["sub_label"]) for r in task.rows(s)} for s in n}
    assert not by_split["train"] & by_split["test"]  # held-out subjects
    # the pretraining sentences never use the probe's manual phrasing
    text = " ".join(k.corpus(fs))
    for _, manual, _ in k.RELATIONS.values():
        assert manual.split("[X]")[0].strip().lower() not in text or not manual.split("[X]")[0].strip()
    assert "capital" not in text and "located" not in text and "official" not in text
