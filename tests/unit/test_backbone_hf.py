"""The frozen HF backbone behind our interface equals Hugging Face's own forward, per family."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ptuning_dist.backbone.hf import HFBackbone, fingerprint
from ptuning_dist.data.collate import Example, collate
from ptuning_dist.errors import ConfigError
from ptuning_dist.model import PTuningModel
from ptuning_dist.ops.splice import splice_reference
from ptuning_dist.prompt.encoder import PromptEncoder
from ptuning_dist.prompt.template import Encoded

FAMILIES = ["gpt2", "llama", "gpt_neox"]


def ragged_batch(V: int, pad: int) -> tuple:
    """Three rows of different lengths (right padding), prompt slots in various places."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for L, pp in ((9, (0, 1, 5)), (6, (2, 3)), (4, ())):
        ids = torch.randint(4, V, (L,), generator=g).tolist()
        for p in pp:
            ids[p] = pad
        rows.append(Example(Encoded(tuple(ids), pp, tuple(range(len(pp))), 5), label=int(ids[-1]), group="g"))
    return collate(rows, pad), rows


def hf_logits(hf, bb, batch, table):
    """Hugging Face's own forward (full B x S x V logits) on our spliced embeddings."""
    embeds = splice_reference(batch.ids_BS, batch.prompt_rows_N, batch.prompt_pos_N, batch.prompt_slots_N,
                              bb.word_embeddings_VH, table)
    return hf(inputs_embeds=embeds, attention_mask=batch.attention_mask_BS).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_hf_and_head_at_targets(family_dirs, family):
    bb = HFBackbone.from_pretrained(family_dirs[family])
    hf = AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    assert all(not p.requires_grad for p in bb.parameters())
    V = bb.word_embeddings_VH.shape[0]
    batch, rows = ragged_batch(V, pad=0)
    enc = PromptEncoder("lstm", 3, bb.hidden_size)
    model = PTuningModel(bb, enc, None)
    table = enc()
    with torch.no_grad():
        full = hf_logits(hf, bb, batch, table)  # B x S x V
        ours = model.logits(batch, table)  # B x V, only at the target positions
    at_target = full[torch.arange(3), batch.target_pos_E]
    assert batch.target_pos_E.tolist() == [8, 5, 3]  # the last real token of each row
    torch.testing.assert_close(ours, at_target, rtol=1e-5, atol=1e-5)
    cands = torch.tensor([7, 3, 11, 5])
    with torch.no_grad():
        torch.testing.assert_close(PTuningModel(bb, enc, cands).logits(batch, table), at_target[:, cands],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_position_is_the_scored_position(family_dirs, family):
    bb = HFBackbone.from_pretrained(family_dirs[family])
    hf = AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    batch, _ = ragged_batch(bb.word_embeddings_VH.shape[0], pad=0)
    enc = PromptEncoder("mlp", 3, bb.hidden_size)
    model = PTuningModel(bb, enc, None)
    with torch.no_grad():
        table = enc()
        full = hf_logits(hf, bb, batch, table)
        loss = model.loss(batch, table)
        rows = torch.arange(3)
        want = F.cross_entropy(full[rows, batch.target_pos_E], batch.label_E)
        shifted = F.cross_entropy(full[rows, batch.target_pos_E - 1], batch.label_E)  # the original code's L-2
        preds = model.logits(batch, table).argmax(-1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert abs(loss - shifted) > 1e-3
    assert torch.equal(preds, full[rows, batch.target_pos_E].argmax(-1))


def test_encoder_gets_gradient_through_frozen_backbone(family_dirs):
    bb = HFBackbone.from_pretrained(family_dirs["llama"])
    batch, _ = ragged_batch(bb.word_embeddings_VH.shape[0], pad=0)
    enc = PromptEncoder("lstm", 3, bb.hidden_size)
    PTuningModel(bb, enc, None).loss(batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert all(p.grad is None for p in bb.parameters())
    bb.train()
    assert not bb.model.training  # the frozen backbone never enters training mode (no dropout)


def test_bf16_and_identity(family_dirs, tmp_path):
    bb = HFBackbone.from_pretrained(family_dirs["gpt2"], "bfloat16")
    assert bb.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="no config.json"):
        HFBackbone.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.dtype"):
        HFBackbone.from_pretrained(family_dirs["gpt2"], "int4")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(family_dirs["gpt2"], copy)
    assert fingerprint(copy) == fingerprint(family_dirs["gpt2"])
    m = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        m.get_input_embeddings().weight[0, 0] += 1
    m.save_pretrained(copy)
    assert fingerprint(copy) != fingerprint(family_dirs["gpt2"])
