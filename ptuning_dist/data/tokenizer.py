"""A thin view of a Hugging Face tokenizer that encodes template pieces one at a time.

Pieces are tokenized separately so that prompt slots, anchors and fields never merge across
boundaries and no special token is added to the vocabulary. Whether a piece needs a leading space
is decided once by probing the tokenizer:

- byte-level BPE (GPT-2, GPT-NeoX): a word's leading space is part of its token ("a the" encodes
  as "a" + " the", not "a" + "the"), so a piece that follows whitespace in the template is encoded
  with a leading space;
- sentencepiece (LLaMA) and word-level tokenizers: the tokenizer handles word starts itself.
"""
from __future__ import annotations

from pathlib import Path


class PieceTokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        enc = lambda t: hf_tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        # Byte-level BPE: "a the" != "a" + "the" but == "a" + " the" (the space belongs to the word).
        joint = enc("a the")
        self.space_prefix = joint != enc("a") + enc("the") and joint == enc("a") + enc(" the")
        plain = enc("x")
        full = hf_tokenizer.encode("x", add_special_tokens=True)
        bos = hf_tokenizer.bos_token_id
        self.bos_id = bos if (bos is not None and full[:1] == [bos] and plain[:1] != [bos]) else None
        pad = hf_tokenizer.pad_token_id
        if pad is None:
            pad = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.vocab_size = len(hf_tokenizer)
        self.unk_id = hf_tokenizer.unk_token_id  # None for byte-level BPE (every text has tokens)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of what maps text to ids: the vocabulary (token -> id, added tokens included), the
        BPE merges and the special tokens, in a canonical order (not the serialisation itself, whose
        layout changes across library versions). A tokenizer with permuted ids or other merges gives
        another fingerprint, so a table or checkpoint made with it is refused."""
        if getattr(self, "_fingerprint", None) is None:
            import hashlib
            import json

            backend = getattr(self.hf, "backend_tokenizer", None)
            merges = json.loads(backend.to_str()).get("model", {}).get("merges", []) if backend is not None else []
            merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # both layouts tokenizers wrote
            canon = {"vocab": sorted(self.hf.get_vocab().items()), "merges": merges,
                     "special": {k: str(v) for k, v in self.hf.special_tokens_map.items()}}
            self._fingerprint = hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()
        return self._fingerprint

    @classmethod
    def from_dir(cls, path: str | Path) -> "PieceTokenizer":
        from transformers import AutoTokenizer

        from ptuning_dist.errors import ConfigError

        try:  # a tokenizer file this program cannot parse is bad input, named; no remote code is run
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions for malformed files
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"model.path: cannot load the tokenizer in {path} ({msg})") from None
        return cls(hf)

    def encode(self, text: str, space_before: bool) -> list[int]:
        if space_before and self.space_prefix:
            text = " " + text
        return self.hf.encode(text, add_special_tokens=False)

    def single_token(self, word: str, space_before: bool = True) -> int | None:
        """The id of ``word`` when it is exactly one token, else None."""
        ids = self.encode(word, space_before)
        return ids[0] if len(ids) == 1 else None

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids))
