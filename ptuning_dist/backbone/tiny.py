"""Tiny backbones built from configs with random weights, saved as ordinary Hugging Face
directories (model and tokenizer). The embedded default job and the tests use them: no hub.

The tokenizer is word-level, built from a word list (the bundled data's words plus anchors),
so every LAMA object is one token.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
ANCHORS = "the of is a an in on and or not ? . , : question answer yes no maybe true false does mean same"


def word_tokenizer(words):
    """A fast word-level tokenizer (whitespace and punctuation split) over ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def words_of(texts) -> list[str]:
    return [w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)]


def build_tiny(out_dir: str | Path, family: str, tokenizer, seed: int = 0, bias_std: float = 0.0,
               max_shard_size: str | None = None, **overrides) -> Path:
    """Build a tiny model of ``family`` (a ``model_type`` of ``backbone/families``) with random
    weights for ``tokenizer``'s vocabulary, and save both with ``save_pretrained`` into ``out_dir``.
    ``bias_std``: random biases (Hugging Face initialises them to zero, which would hide a bias
    mapped to the wrong place); ``max_shard_size``: save as several safetensors files plus an index."""
    from transformers import AutoModelForCausalLM

    from ptuning_dist.backbone.families import family as family_of

    cfg = family_of(family).tiny_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if bias_std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, bias_std)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(out_dir)
    return out_dir


def default_backbone(out_dir: str | Path) -> Path:
    """The embedded default: a 2-layer, 64-wide GPT-2 over the bundled task's words. Built once
    into ``out_dir`` (deterministic: same seed, same weights) and reused when already there."""
    from ptuning_dist.data.tasks import BUNDLED_LAMA

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    texts = [p.read_text() for p in sorted(BUNDLED_LAMA.rglob("*.jsonl"))]
    import json

    words = []
    for t in texts:
        for line in t.splitlines():
            obj = json.loads(line)
            words += words_of([str(v) for v in obj.values()])
    words += ANCHORS.split()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    # initializer_range 0.2 (GPT-2's is 0.02): a random 64-wide head at 0.02 gives logits within
    # about +-0.2, so no prompt could make a confident prediction and the demo would not learn.
    build_tiny(tmp, "gpt2", word_tokenizer(words), seed=0, initializer_range=0.2)
    tmp.rename(out_dir)  # atomic: a half-built model is never taken for a good one
    return out_dir
