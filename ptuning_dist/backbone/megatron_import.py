"""Hugging Face -> megatron-core, sharded for this rank's TP position and cut to this rank's
pipeline stage at load time (megatron-core 0.16 has no importer).

Each family file (``backbone/families/``) holds its name map (``to_megatron``) and its
TransformerConfig fields; this module holds what they share and builds the stage:
- ``tp_shard``: column-parallel weights split their output rows, row-parallel ones their input
  columns, replicated ones (norms, row-parallel biases, positions) stay whole;
- ``pad_vocab``: the vocabulary-parallel tables are padded with zero rows to a multiple of TP;
- ``select_stage``: stage s holds layers [s L/pp, (s+1) L/pp), renumbered from 0; the first stage
  holds the embeddings, the last the final norm and the output layer. A tied head at pp > 1 gets
  its own copy of the REAL word embeddings (megatron would zero it and all-reduce it from stage 0
  at start-up; loading it here leaves nothing random on the last stage).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ptuning_dist.backbone.families import family
from ptuning_dist.errors import ConfigError
from ptuning_dist.planning.layout import check_model
from ptuning_dist.planning.shape import padded_vocab


def tp_shard(w: torch.Tensor, dim: int | None, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s chunk of ``w`` along ``dim`` (None: replicated, ``w`` itself). A copy: a
    view would keep the whole full-size tensor alive."""
    return w if dim is None else w.chunk(tp, dim=dim)[rank].clone()


def pad_vocab(w_VH: torch.Tensor, tp: int) -> torch.Tensor:
    """A vocabulary table with zero rows appended up to a multiple of TP."""
    return F.pad(w_VH, (0, 0, 0, padded_vocab(w_VH.shape[0], tp) - w_VH.shape[0]))


def transformer_config(hf_config, dtype: torch.dtype, tp: int, pp: int):
    """megatron's TransformerConfig: the family's fields plus the common ones. No dropout: the
    backbone is frozen, so train and eval mode compute the same thing (megatron's recompute needs
    train mode). Point-to-point transfers are not batched: batched p2p swapped activations and
    gradients in megatron's interleaved schedule at PP=2 (cpu-facts), and unbatched costs nothing
    on 1F1B."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    common = dict(hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not torch.cuda.is_available(),
                  params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                  tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, batch_p2p_comm=False)
    return TransformerConfig(**family(hf_config.model_type, need="megatron").megatron_config(hf_config), **common)


def build_stage(hf_model, dtype: torch.dtype, tp: int, tp_rank: int, pp: int, stage: int):
    """This rank's frozen GPTModel stage (local layer spec), loaded from an HF model's weights."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = hf_model.config
    fam = family(cfg.model_type, need="megatron")
    shape = fam.shape(cfg.to_dict())
    check_model(shape, tp, pp)
    state = {k: v.to(dtype) for k, v in hf_model.state_dict().items()}
    shard = fam.to_megatron(state, cfg, tp, tp_rank)
    del state
    style = shape.style
    spec = get_gpt_layer_local_spec() if style.norm_bias else get_gpt_layer_local_spec(normalization="RMSNorm")
    # Tied at pp = 1: one table serves both ends. At pp > 1 the last stage holds its own copy, loaded
    # with the real embeddings here (megatron's own tying would zero it, then all-reduce it over the
    # embedding group from stage 0, with a .cuda() on the way).
    share = shape.tied_embeddings and pp == 1
    gpt = GPTModel(transformer_config(cfg, dtype, tp, pp), spec, vocab_size=padded_vocab(shape.vocab, tp),
                   max_sequence_length=shape.max_positions, pre_process=stage == 0, post_process=stage == pp - 1,
                   position_embedding_type="learned_absolute" if style.learned_positions else "rope",
                   share_embeddings_and_output_weights=share, **fam.gpt_model_kwargs(cfg))
    shard = select_stage(shard, shape.layers, pp, stage, output_from_embeddings=shape.tied_embeddings and not share)
    missing, unexpected = gpt.load_state_dict(shard, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConfigError(f"HF -> megatron import (stage {stage}): missing {missing}, unexpected {unexpected}")
    return gpt


def select_stage(shard: dict, num_layers: int, pp: int, stage: int, output_from_embeddings: bool) -> dict:
    """The part of a full-depth state dict that pipeline stage ``stage`` of ``pp`` holds, its
    layers renumbered from 0. ``output_from_embeddings``: a tied head at pp > 1, whose last stage
    holds its own ``output_layer`` loaded with the word embeddings."""
    per = num_layers // pp
    first, last = stage == 0, stage == pp - 1
    out = {}
    for name, w in shard.items():
        if name.startswith("decoder.layers."):
            _, _, i, rest = name.split(".", 3)
            if stage * per <= int(i) < (stage + 1) * per:
                out[f"decoder.layers.{int(i) - stage * per}.{rest}"] = w
        elif name.startswith("embedding."):
            if first:
                out[name] = w
        elif last:  # decoder.final_layernorm.*, output_layer.*
            out[name] = w
    if last and output_from_embeddings:
        out["output_layer.weight"] = shard["embedding.word_embeddings.weight"]
    return out
