"""Hugging Face safetensors -> megatron-core, read shard-wise: each rank reads only its pipeline
stage's tensors and, of each, only its tensor-parallel slice, converted to the run's dtype, one
tensor at a time (megatron-core 0.16 has no importer).

Each family file (``backbone/families/``) holds its name map (``megatron_layer`` /
``megatron_globals``: megatron name -> a thunk reading this rank's slice) and its TransformerConfig
fields; this module holds what they share and builds the stage:
- ``part``: column-parallel weights split their output rows, row-parallel ones their input
  columns, replicated ones (norms, row-parallel biases, positions) are read whole;
- ``vocab_shard``: the vocabulary-parallel tables are padded with zero rows (``padded_vocab``: to a
  multiple of lcm(128, TP)); each rank reads its rows of the real vocabulary and pads its own shard;
- ``stage_tensors``: stage s holds layers [s L/pp, (s+1) L/pp), renumbered from 0; the first
  stage holds the embeddings, the last the final norm and the output layer. A tied head at pp > 1
  gets its own copy of the REAL word embeddings' vocabulary shard (megatron would zero it and
  all-reduce it from stage 0 at start-up; loading it here leaves nothing random on the last stage).
- ``build_stage``: the GPTModel stage is allocated uninitialised (``perform_initialization`` off:
  every weight is then written from the files, which the name check guarantees), and filled
  tensor by tensor. Host peak while loading: the stage's own shard plus the one slice in flight.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ptuning_dist.backbone.families import family
from ptuning_dist.errors import CheckpointError, ConfigError
from ptuning_dist.planning.layout import check_model
from ptuning_dist.planning.shape import padded_vocab


def part(n: int, tp: int, rank: int) -> tuple[int, int]:
    """TP rank ``rank``'s range [a, b) of ``n`` rows (n divisible by tp: the layout checks ensure it)."""
    per = n // tp
    return rank * per, (rank + 1) * per


def lazy(read, *args, **kwargs):
    """A thunk reading one slice when called."""
    return lambda: read(*args, **kwargs)


def vocab_shard(read, name: str, vocab: int, hidden: int, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s rows of a vocabulary table padded with zero rows to a multiple of TP:
    only its rows of the real vocabulary are read."""
    a, b = part(padded_vocab(vocab, tp), tp, rank)
    real = read(name, (vocab, hidden), rows=(min(a, vocab), min(b, vocab)))
    return F.pad(real, (0, 0, 0, (b - a) - real.shape[0]))


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


def hf_config(model_dir: str | Path):
    """The Hugging Face config of a model directory (config.json only: no weights, no code)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.path: {Path(model_dir) / 'config.json'}: not a usable Hugging Face config "
                          f"({str(e).splitlines()[0]})") from None


def new_stage(cfg, dtype: torch.dtype, tp: int, pp: int, stage: int):
    """This rank's GPTModel stage (local layer spec), allocated but not initialised: a loader
    writes every weight."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from ptuning_dist.backbone.megatron_attention import use_sdpa

    fam = family(cfg.model_type, need="megatron")
    shape = fam.shape(cfg.to_dict())
    check_model(shape, tp, pp)
    style = shape.style
    spec = get_gpt_layer_local_spec() if style.norm_bias else get_gpt_layer_local_spec(normalization="RMSNorm")
    use_sdpa(spec)  # the attention core as one fused SDPA call (backbone/megatron_attention.py)
    # Tied at pp = 1: one table serves both ends. At pp > 1 the last stage holds its own copy, loaded
    # with the real embeddings (megatron's own tying would zero it, then all-reduce it over the
    # embedding group from stage 0, with a .cuda() on the way).
    share = shape.tied_embeddings and pp == 1
    tcfg = transformer_config(cfg, dtype, tp, pp)
    tcfg.perform_initialization = False  # every weight is loaded; random init of a 70B stage costs minutes
    return GPTModel(tcfg, spec, vocab_size=padded_vocab(shape.vocab, tp), max_sequence_length=shape.max_positions,
                    pre_process=stage == 0, post_process=stage == pp - 1,
                    position_embedding_type="learned_absolute" if style.learned_positions else "rope",
                    share_embeddings_and_output_weights=share, **fam.gpt_model_kwargs(cfg))


def stage_tensors(fam, read, cfg, tp: int, tp_rank: int, pp: int, stage: int) -> dict:
    """megatron name (stage-local) -> thunk, for what pipeline stage ``stage`` of ``pp`` holds."""
    shape = fam.shape(cfg.to_dict())
    per = shape.layers // pp
    first, last = stage == 0, stage == pp - 1
    out = {}
    for local in range(per):
        for name, thunk in fam.megatron_layer(read, cfg, tp, tp_rank, stage * per + local).items():
            out[f"decoder.layers.{local}.{name}"] = thunk
    globals_ = fam.megatron_globals(read, cfg, tp, tp_rank)
    for name, thunk in globals_.items():
        if name.startswith("embedding.") and first or not name.startswith("embedding.") and last:
            out[name] = thunk
    if last and shape.tied_embeddings and pp > 1:  # the last stage's own copy of the tied head
        out["output_layer.weight"] = globals_["embedding.word_embeddings.weight"]
    return out


def fill(gpt, thunks: dict, where: str) -> None:
    """Write every parameter of ``gpt`` from its thunk, one tensor at a time."""
    params = dict(gpt.named_parameters())
    missing, unexpected = sorted(set(params) - set(thunks)), sorted(set(thunks) - set(params))
    if missing or unexpected:
        raise ConfigError(f"HF -> megatron import ({where}): missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, thunk in thunks.items():
            w = thunk()
            if w.shape != params[name].shape:
                raise CheckpointError(f"{where}: {name} read as {list(w.shape)}, the stage holds "
                                      f"{list(params[name].shape)}")
            params[name].copy_(w)
            del w  # the one slice in flight


def build_stage(model_dir: str | Path, dtype: torch.dtype, tp: int, tp_rank: int, pp: int, stage: int):
    """This rank's frozen GPTModel stage, read shard-wise from the model directory's safetensors.
    Returns (GPTModel, the reader's counts: bytes read and files opened)."""
    from ptuning_dist.backbone.safetensors_io import WeightFiles

    cfg = hf_config(model_dir)
    fam = family(cfg.model_type, need="megatron", where=str(Path(model_dir) / "config.json"))
    gpt = new_stage(cfg, dtype, tp, pp, stage)
    with WeightFiles(model_dir, dtype) as files:
        fill(gpt, stage_tensors(fam, files.read, cfg, tp, tp_rank, pp, stage), f"{model_dir} stage {stage}")
        report = {"bytes_read": files.bytes_read, "files_opened": files.files_opened}
    return gpt, report
