"""The registry of backbone families: ``model_type`` -> its family file (see ``base.py``).

Adding a family is one file here plus one line in ``FAMILIES``; the hf backend runs any Hugging
Face causal LM whose ``base_model`` returns the final-norm hidden state and whose head is a plain
linear layer, the megatron backend and the memory model the families with a ``style``.
"""
from __future__ import annotations

from ptuning_dist.backbone.families.base import Family
from ptuning_dist.backbone.families.gpt2 import GPT2
from ptuning_dist.backbone.families.gpt_neox import GPTNeoX
from ptuning_dist.backbone.families.llama import Llama
from ptuning_dist.backbone.families.mistral import Mistral
from ptuning_dist.backbone.families.qwen2 import Qwen2
from ptuning_dist.errors import ConfigError

FAMILIES: dict[str, type[Family]] = {f.model_type: f for f in (GPT2, Llama, Mistral, Qwen2, GPTNeoX)}


def megatron_families() -> list[str]:
    """The model types with a megatron layout (importer and memory model)."""
    return [name for name, f in FAMILIES.items() if f.style is not None]


def family(model_type: str | None, need: str | None = "any", where: str = "") -> type[Family] | None:
    """The family of ``model_type``. ``need="megatron"``: one with a megatron importer, else a
    ConfigError naming ``where`` (the config.json); ``need=None``: None when there is none."""
    fam = FAMILIES.get(model_type)
    if need == "megatron" and (fam is None or fam.style is None):
        raise ConfigError(f"model.backend = megatron: no importer for model_type {model_type!r}"
                          f"{' in ' + where if where else ''} ({', '.join(megatron_families())})")
    if fam is None and need is not None:
        raise ConfigError(f"no backbone family for model_type {model_type!r} ({', '.join(FAMILIES)})")
    return fam
