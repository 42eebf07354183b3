"""Tiny backbones of three families, with tokenizers trained here (no hub): built once per session."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# One ninja for this process and every one it starts (compat/build_lock.py: two ninjas rebuild the
# JIT extensions whenever processes alternate between them)
from ptuning_dist.compat.build_lock import use_interpreter_ninja  # noqa: E402

use_interpreter_ninja()

from shared_data import FEWGLUE  # noqa: E402


def fewglue_texts(limit_per_file: int = 200) -> list[str]:
    texts = []
    for task in ("RTE", "CB", "BoolQ", "WiC"):
        for split in ("train", "dev32", "val"):
            with open(FEWGLUE / task / f"{split}.jsonl") as f:
                for i, line in enumerate(f):
                    if i >= limit_per_file:
                        break
                    texts += [str(v) for v in json.loads(line).values() if isinstance(v, str)]
    # the verbalizer and anchor words must be single tokens, as they are in real GPT-2 and LLaMA vocabularies
    return texts + ["Answer: yes no maybe true false Question Answer capital official language the ? . :"] * 2000


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """Byte-level BPE (the GPT-2 / GPT-NeoX scheme) trained on FewGLUE text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(fewglue_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A sentencepiece (LLaMA-style) tokenizer trained on FewGLUE text, loaded the way a LLaMA
    checkpoint's tokenizer.model is (transformers converts it)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(fewglue_texts()))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "sp"), vocab_size=1000,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=3,
                                   minloglevel=2, num_threads=1)
    (d / "tok").mkdir()
    (d / "sp.model").rename(d / "tok" / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(d / "tok"), add_bos_token=True)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, bpe_tokenizer, sp_tokenizer):
    from ptuning_dist.backbone.tiny import build_tiny

    root = tmp_path_factory.mktemp("families")
    return {
        "gpt2": build_tiny(root / "gpt2", "gpt2", bpe_tokenizer, seed=0, initializer_range=0.2),
        "llama": build_tiny(root / "llama", "llama", sp_tokenizer, seed=0, initializer_range=0.2),
        "gpt_neox": build_tiny(root / "gpt_neox", "gpt_neox", bpe_tokenizer, seed=0, initializer_range=0.2),
    }


# The LLaMA-shaped tiny models of sharded_dirs: 8 heads in 4 key/value groups (GQA, divisible at TP 4)
GQA = dict(num_attention_heads=8, num_key_value_heads=4)
SHARDED = {"gpt2": dict(), "llama": dict(GQA, tie_word_embeddings=False),
           "mistral": dict(GQA, tie_word_embeddings=True), "qwen2": dict(GQA, tie_word_embeddings=False)}


@pytest.fixture(scope="session")
def sharded_dirs(tmp_path_factory, bpe_tokenizer, sp_tokenizer):
    """The four megatron families saved as many small safetensors files plus an index (every tensor
    path crosses files), random biases, and a vocabulary 3 rows larger than the tokenizer's (odd:
    padded at TP 2 and 4)."""
    from ptuning_dist.backbone.tiny import build_tiny

    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for fam, over in SHARDED.items():
        tok = bpe_tokenizer if fam == "gpt2" else sp_tokenizer
        out[fam] = build_tiny(root / fam, fam, tok, seed=0, initializer_range=0.2, bias_std=0.2,
                              max_shard_size="40KB", vocab_size=len(tok) + 3, **over)
    return out


@pytest.fixture(scope="session")
def word_piece(tmp_path_factory):
    """The embedded default's word-level tokenizer, as the trainer sees it."""
    from ptuning_dist.backbone.tiny import default_backbone
    from ptuning_dist.data.tokenizer import PieceTokenizer

    return PieceTokenizer.from_dir(default_backbone(tmp_path_factory.mktemp("word") / "backbone"))


@pytest.fixture(scope="session")
def bpe_piece(family_dirs):
    from transformers import AutoTokenizer

    from ptuning_dist.data.tokenizer import PieceTokenizer

    return PieceTokenizer(AutoTokenizer.from_pretrained(family_dirs["gpt2"]))


@pytest.fixture(scope="session")
def backbone(tmp_path_factory):
    """The embedded default GPT-2 (2 layers, tied embeddings): what the multi-process tests train."""
    from ptuning_dist.backbone.tiny import default_backbone

    return default_backbone(tmp_path_factory.mktemp("dist") / "backbone")


@pytest.fixture(scope="session")
def reference(backbone, tmp_path_factory):
    """Single process, HF backend, no DeepSpeed, the reference splice: micro 4 x accumulation 4 = the
    global batch of 16 that the parallel runs (fused splice) split; every parallel layout is compared
    with it."""
    from distutil import COMMON, WORKER, run

    out = tmp_path_factory.mktemp("ref")
    run([sys.executable, WORKER, "--record", out / "rec", "--model", backbone, "--output_dir", out,
         "--splice", "reference", *COMMON])
    return out


@pytest.fixture(scope="session")
def llama_reference(family_dirs, tmp_path_factory):
    """The tiny LLaMA on RTE in one process (HF backend, reference splice): what the LLaMA TP and PP
    runs are compared with."""
    from distutil import COMMON, LLAMA_RTE, WORKER, run

    out = tmp_path_factory.mktemp("llama_ref")
    run([sys.executable, WORKER, "--record", out / "rec", "--output_dir", out, "--model", family_dirs["llama"],
         "--splice", "reference", *LLAMA_RTE, *COMMON])
    return out


# ---- tiers by folder: unit (fast), dist (2-8 gloo ranks), e2e (launcher runs), gpu (CUDA only)
TIER_MARKS = {"dist": "dist", "e2e": "slow", "gpu": "gpu"}


def pytest_collection_modifyitems(config, items):
    """Each test is marked by its folder's tier, so ``-m "not slow and not dist"`` is tests/unit;
    ``gpu`` tests are skipped, with the reason, where torch sees no CUDA device."""
    import torch

    here = Path(__file__).resolve().parent
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False here)")
    for item in items:
        tier = Path(item.fspath).resolve().relative_to(here).parts[0]
        if tier in TIER_MARKS:
            item.add_marker(getattr(pytest.mark, TIER_MARKS[tier]))
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_cuda)
