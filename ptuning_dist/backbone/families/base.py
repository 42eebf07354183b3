"""What a backbone family file provides: one file per Hugging Face ``model_type``.

A family is a class with class-level methods (no instances), registered in ``families/__init__.py``:

- ``shape(cfg)``: config.json (a mapping) -> ``ModelShape``, for the memory model, the planner and
  the layout rules (``planning/``);
- ``tiny_config(vocab_size, bos_token_id, eos_token_id)``: the tiny Hugging Face config the tests
  and the embedded default build (``backbone/tiny.py``);
- the megatron backend, where ``style`` is set (a family without it runs on the hf backend only):
  ``megatron_config(cfg)``, the fields of megatron's ``TransformerConfig`` beyond the common ones
  (``backbone/megatron.py`` adds dtype, TP/PP, no dropout); ``gpt_model_kwargs(cfg)``, what
  ``GPTModel`` needs beyond the shape; and the Hugging Face -> megatron name map, read shard-wise:
  ``megatron_layer(read, cfg, tp, rank, i)`` (names under ``decoder.layers.<i>.``) and
  ``megatron_globals(read, cfg, tp, rank)`` (embeddings, final norm, an own head), each a dict of
  megatron name -> a thunk that reads this TP rank's slice of the Hugging Face tensors through
  ``read`` (``safetensors_io.WeightFiles.read``) and returns it in megatron's layout. Thunks, so
  that the importer reads only this pipeline stage's tensors, one at a time
  (``backbone/megatron_import.py`` holds the shared helpers and the pipeline cut);
- ``attention_window(cfg)``: a sliding attention window (Mistral), or None.

Importing a family file does not import torch: the planner reads shapes without it.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

from ptuning_dist.planning.shape import LayerStyle, ModelShape


class Family:
    model_type: ClassVar[str]
    style: ClassVar[LayerStyle | None] = None  # megatron's layer layout; None: no megatron backend

    @classmethod
    def shape(cls, cfg: Mapping) -> ModelShape:
        raise ValueError(f"no memory model for model_type {cls.model_type!r}")

    @classmethod
    def tiny_config(cls, **common) -> Any:
        raise NotImplementedError

    @classmethod
    def megatron_config(cls, cfg) -> dict:
        raise NotImplementedError

    @classmethod
    def gpt_model_kwargs(cls, cfg) -> dict:
        return {}

    @classmethod
    def megatron_layer(cls, read, cfg, tp: int, rank: int, i: int) -> dict:
        raise NotImplementedError

    @classmethod
    def megatron_globals(cls, read, cfg, tp: int, rank: int) -> dict:
        raise NotImplementedError

    @classmethod
    def attention_window(cls, cfg) -> int | None:
        return None
