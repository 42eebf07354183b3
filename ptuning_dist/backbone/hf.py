"""A frozen Hugging Face causal LM behind the backbone protocol (``backbone/base.py``).

- ``word_embeddings_VH``: the frozen input-embedding table the splice reads.
- ``hidden_at(embeds_BSH, attention_mask_BS, target_pos_E, ...)``: run the transformer body on
  spliced embeddings (``inputs_embeds``) and return the final hidden state at the targets only.
- ``head(hidden_EH, candidate_ids_K)``: the LM head applied to those E rows, restricted to the
  candidate ids (verbalizer or allowed vocabulary) when given: never the full B x S x V logits.

Tested for the GPT-2, LLaMA and GPT-NeoX families: their ``base_model`` returns the hidden state
after the final norm, and their head is a plain (possibly tied) linear layer. A family whose head
adds logit scaling or soft-capping would need its own ``head``.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from ptuning_dist.backbone.base import freeze
from ptuning_dist.config import Dtype, choices
from ptuning_dist.errors import CheckpointError, ConfigError

DTYPES = {name: getattr(torch, name) for name in choices(Dtype)}


class HFBackbone(nn.Module):
    is_first_stage = is_last_stage = True  # never pipelined (the megatron backbone is)

    def __init__(self, model: nn.Module, path: str | None = None):
        super().__init__()
        freeze(model)
        model.eval()  # frozen: no dropout in the backbone, same numerics in train and eval
        self.model = model
        self.path = path
        self.unfilled: str | None = None  # "zero3" / "fsdp2": built empty, parallelize fills the partitions
        self.hidden_size = model.get_input_embeddings().embedding_dim  # weight may be ZeRO-3 partitioned

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32") -> "HFBackbone":
        from transformers import AutoModelForCausalLM

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path: {path} is not a Hugging Face model directory (no config.json)")
        if dtype not in DTYPES:
            raise ConfigError(f"model.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True)
        return cls(model, str(path))

    @classmethod
    def empty(cls, path: str | Path, dtype: str, zero3: bool) -> "HFBackbone":
        """The model of ``path``'s config.json with no weights read and none initialised, for a
        loader that fills each rank's partition from the files afterwards
        (``parallel/shardwise.py``). ``zero3``: built under ``zero.Init`` (the caller keeps
        ``HfDeepSpeedConfig`` alive), each parameter partitioned as it is created; else its
        parameters on the meta device (buffers real: RoPE's frequencies are computed, not loaded),
        for FSDP2 to shard and materialise."""
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        path = Path(path)
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with no_init_weights(), (nullcontext() if zero3 else params_on_meta()):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        model.tie_weights()  # no_init_weights skips init_weights, which is where from_config ties the head
        bb = cls(model, str(path))
        bb.unfilled = "zero3" if zero3 else "fsdp2"
        return bb

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the frozen backbone never enters training mode
        return self

    def external_weights(self) -> list[nn.Parameter]:
        """Weights read as tensors, not through their module's forward: the word embeddings (the
        splice) and the head (scored at the targets and candidates only)."""
        head = self.model.get_output_embeddings()
        params = [self.model.get_input_embeddings().weight, head.weight] + ([head.bias] if head.bias is not None else [])
        return list({id(p): p for p in params}.values())

    def splice(self, ids_BS, slot_BS, table_MH, position_BS=None) -> torch.Tensor:
        """embeds_BSH by the fused op (``ptuning::splice``): every row written once. Positions are
        the model's own (``hidden_at`` passes a packed batch's ``position_BS`` as position ids)."""
        from ptuning_dist.ops.splice import splice

        return splice(ids_BS, slot_BS, self.word_embeddings_VH, table_MH)

    def reference_splice(self, ids_BS, prompt_rows_N, prompt_pos_N, prompt_slots_N, table_MH,
                         position_BS=None) -> torch.Tensor:
        """The oracle: look up every token, then insert the prompt rows."""
        from ptuning_dist.ops.splice import splice_reference

        return splice_reference(ids_BS, prompt_rows_N, prompt_pos_N, prompt_slots_N, self.word_embeddings_VH,
                                table_MH)

    @property
    def word_embeddings_VH(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def dtype(self) -> torch.dtype:
        return self.word_embeddings_VH.dtype

    def set_input_tensor(self, input_tensor) -> None:
        raise NotImplementedError("the hf backend is never pipelined (parallel.pp > 1 needs model.backend = megatron)")

    def hidden_at(self, embeds_BSH, attention_mask_BS, target_pos_E, target_row_E=None, position_BS=None,
                  segment_BS=None) -> torch.Tensor:
        """The final hidden state at each example's target. A packed batch (``position_BS`` and
        ``segment_BS``, see data/packing.py) gets its prefix-sharing mask, built here on the
        device, and its position ids; ``target_row_E`` then says which packed row holds a target."""
        position_ids = None
        if position_BS is not None:
            from ptuning_dist.data.packing import packed_attention_mask

            impl = self.model.config._attn_implementation
            if impl not in ("sdpa", "eager"):  # flash-attention kernels take no custom 4D mask
                raise ConfigError(f"data.packing: the backbone's attention implementation {impl!r} takes no "
                                  "packed mask; use --packing off")
            allowed_B1SS = packed_attention_mask(position_BS, segment_BS)
            if impl == "sdpa":
                attention_mask_BS = allowed_B1SS  # boolean, True = attend
            else:  # eager adds the mask to the scores
                blocked = torch.tensor(torch.finfo(embeds_BSH.dtype).min, dtype=embeds_BSH.dtype, device=embeds_BSH.device)
                attention_mask_BS = torch.where(allowed_B1SS, torch.zeros_like(blocked), blocked)
            position_ids = position_BS
        out = self.model.base_model(inputs_embeds=embeds_BSH, attention_mask=attention_mask_BS,
                                    position_ids=position_ids, use_cache=False)
        hidden_BSH = out.last_hidden_state
        if target_row_E is None:
            target_row_E = torch.arange(hidden_BSH.shape[0], device=hidden_BSH.device)
        return hidden_BSH[target_row_E, target_pos_E]

    def head(self, hidden_EH: torch.Tensor, candidate_ids_K: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32) over the candidates, or over the whole vocabulary when None."""
        lm_head = self.model.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if candidate_ids_K is not None:
            weight = weight[candidate_ids_K]
            bias = bias[candidate_ids_K] if bias is not None else None
        return nn.functional.linear(hidden_EH, weight, bias).float()


@contextmanager
def params_on_meta():
    """Every parameter registered inside is moved to the meta device as it is registered (one
    uninitialised parameter at a time exists on the host); buffers stay real (accelerate's
    ``init_empty_weights(include_buffers=False)``, without the dependency)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # a tied parameter stays the same object
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def fingerprint(path: str | Path) -> str:
    """A cheap identity of a model directory: config.json, and each weight file's name, size and
    the hash of its first and last MiB. Hashing every byte of a 1T-parameter model would take
    longer than the run; this catches a different model, a re-saved one or a truncated file."""
    path = Path(path)
    h = hashlib.sha256()
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"backbone {path}: no config.json to identify it by")
    h.update(json.dumps(json.loads(cfg.read_text()), sort_keys=True).encode())
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    for w in weights:
        size = w.stat().st_size
        h.update(f"{w.name}:{size}".encode())
        with w.open("rb") as f:
            h.update(f.read(1 << 20))
            if size > (2 << 20):
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()
