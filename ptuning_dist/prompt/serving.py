"""Serving a trained table outside this project: PEFT adapters and ``inputs_embeds``.

- ``save_peft_adapters``: for every prompt group whose template is a pure prefix (``[P*m]`` first,
  no other prompt slot, and a tokenizer that adds no BOS token before it), a Hugging Face PEFT
  ``PROMPT_TUNING`` adapter directory, ``<table>/peft/<group>/`` (``adapter_config.json`` +
  ``adapter_model.safetensors`` holding ``prompt_embeddings``, m x h): ``PeftModel.from_pretrained(
  base, that_dir)`` then prepends exactly these rows to the input embeddings, which is what this
  project's splice computes for such a template (tested with the real peft). Other templates put
  prompt tokens between words, which a PEFT prompt-tuning adapter cannot express: the sidecar
  says why each group has none.
- ``row_inputs_embeds``: any template shape. The ``inputs_embeds`` (1 x L x h) of one row: its
  tokens looked up in the model's input embeddings, the group's table rows at its prompt
  positions; pass them to ``model(inputs_embeds=...)``, ``model.generate(inputs_embeds=...)`` or a
  serving engine's prompt-embeddings input.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ptuning_dist.prompt.groups import PromptGroups
from ptuning_dist.prompt.template import Template


def prefix_slots(template: Template) -> int | None:
    """m when the template's only prompt slots are its first m parts, else None."""
    kinds = [p.kind for p in template.parts]
    n = 0
    while n < len(kinds) and kinds[n] == "prompt":
        n += 1
    if n == 0 or "prompt" in kinds[n:]:
        return None
    return sum(p.count for p in template.parts[:n])


def save_peft_adapters(table_dir, table_MH: torch.Tensor, groups: PromptGroups, templates: dict[str, Template],
                       hf_cfg, base_model: str, adds_bos: bool) -> dict:
    """Write one adapter per pure-prefix group; returns {group: "peft/<dir>" or the reason for none}."""
    out, table_dir = {}, Path(table_dir)
    for name in groups.names:
        template = templates.get(name, next(iter(templates.values())))
        m = prefix_slots(template)
        if m is None:
            out[name] = f"none: the template {template.text!r} is not a pure [P*m] prefix"
            continue
        if adds_bos:
            out[name] = "none: the tokenizer adds a BOS token before the prompt, PEFT prepends before it"
            continue
        a, b = groups.rows(name)
        d = table_dir / "peft" / re.sub(r"[^\w.-]", "_", name)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": m,
               "token_dim": int(table_MH.shape[1]), "num_transformer_submodules": 1,
               "num_attention_heads": int(hf_cfg.num_attention_heads), "num_layers": int(hf_cfg.num_hidden_layers),
               "prompt_tuning_init": "RANDOM", "base_model_name_or_path": base_model, "inference_mode": True}
        save_file({"prompt_embeddings": table_MH[a:b].detach().float().cpu().contiguous()},
                  str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        out[name] = f"peft/{d.name}"
    return out


@torch.no_grad()
def row_inputs_embeds(table_dir, model, tokenizer, values: dict, group: str | None = None,
                      max_len: int = 1 << 20) -> torch.Tensor:
    """The ``inputs_embeds`` (1 x L x h) of one row (its field ``values``) for a Hugging Face
    ``model`` and its ``tokenizer``, through the exported table at ``table_dir`` (its sidecar
    gives the template and which rows are ``group``'s; None: the table's only group). Everything
    up to the template's [MASK]: what the model continues from."""
    from ptuning_dist.data.tokenizer import PieceTokenizer
    from ptuning_dist.errors import PTuningError
    from ptuning_dist.prompt.export import load_table

    table_MH, meta = load_table(table_dir)
    groups: PromptGroups = meta["groups"]
    if group is None:
        if len(groups.names) != 1:
            raise PTuningError(f"prompt table {table_dir} holds the groups {list(groups.names)}: name one")
        group = groups.names[0]
    if group not in groups.names and groups.names != ("shared",):
        raise PTuningError(f"prompt table {table_dir} has no group {group!r} ({list(groups.names)})")
    name = group if group in groups.names else "shared"
    template = Template(meta.get("templates", {}).get(group, meta["template"]))
    tok = tokenizer if isinstance(tokenizer, PieceTokenizer) else PieceTokenizer(tokenizer)
    enc = template.encode(values, None, tok, max_len, "row")
    emb = model.get_input_embeddings()
    ids = torch.tensor(enc.ids, device=emb.weight.device)
    embeds_SH = emb(ids).clone()
    offset = groups.rows(name)[0]
    slots = torch.tensor(enc.prompt_slot, dtype=torch.long) + offset
    embeds_SH[list(enc.prompt_pos)] = table_MH[slots].to(embeds_SH)
    return embeds_SH.unsqueeze(0)
