"""Packed micro-batches (data/packing.py) against the padded layout: the same logits, loss and prompt
gradient; the plan, bins and mask as specified; the trainer's losses with packing on and off."""
from __future__ import annotations

import json

import pytest
import torch

from ptuning_dist.backbone.hf import HFBackbone
from ptuning_dist.backbone.tiny import default_backbone
from ptuning_dist.config import from_dict
from ptuning_dist.data.collate import Example, collate
from ptuning_dist.data.scoring import sequences
from ptuning_dist.data.packing import (assign_bins, forward_groups, pack, packed_attention_mask, packed_size,
                                       shared_prefix_len, step_forwards)
from ptuning_dist.errors import ConfigError
from ptuning_dist.model import PTuningModel
from ptuning_dist.prompt.encoder import PromptEncoder
from ptuning_dist.prompt.template import Encoded
from ptuning_dist.train.recipe import train

FAMILIES = ["gpt2", "llama", "gpt_neox"]


def rows_with_prefix(V: int, pad: int, prefix_slots: int, anchors: int, lengths, seed=0, suffix_slots=(1,)):
    """Rows sharing ``prefix_slots`` prompt tokens then ``anchors`` literal tokens, then their own
    tokens (with prompt slots at ``suffix_slots`` offsets into the own part, when long enough)."""
    g = torch.Generator().manual_seed(seed)
    anchor_ids = torch.randint(4, V, (anchors,), generator=g).tolist()
    out = []
    for i, L in enumerate(lengths):
        own = torch.randint(4, V, (L,), generator=g).tolist()
        ids = [pad] * prefix_slots + anchor_ids + own
        pos = list(range(prefix_slots))
        P = prefix_slots + anchors
        pos += [P + o for o in suffix_slots if o < L - 1]
        for p in pos:
            ids[p] = pad
        out.append(Example(Encoded(tuple(ids), tuple(pos), tuple(range(len(pos))), 7), label=int(own[-1]) % V,
                           group="g"))
    return out


def test_prefix_bins_and_plan():
    ex = rows_with_prefix(50, 0, 3, 2, [4, 1, 6, 2])
    encs = [e.enc for e in ex]
    assert shared_prefix_len(encs) == 5
    assert shared_prefix_len(encs[:1]) == len(encs[0].ids)  # one row: all of it is shared
    # different slots at the same position end the prefix even if the ids agree
    a = Encoded((0, 9, 9), (0,), (0,), 1)
    b = Encoded((0, 9, 9), (0,), (1,), 1)
    assert shared_prefix_len([a, b]) == 0
    # suffixes 4, 1, 3, 2 into bins of 9 (prefix 5), longest first: 4 | 3 then 1 | 2
    assert assign_bins([9, 6, 8, 7], 5, 9) == [[0], [2, 1], [3]]
    batch = pack(sequences(ex)[0], ex, 0, capacity=12)
    # every row's tokens, slots and target are found where the plan says, with its own positions
    for b, e in enumerate(ex):
        k, t = int(batch.target_row_E[b]), int(batch.target_pos_E[b])
        seg = int(batch.segment_BS[k, t])
        own = (batch.segment_BS[k] == seg).nonzero().flatten().tolist()
        prefix = (batch.segment_BS[k] == 0).nonzero().flatten().tolist()
        assert [int(batch.ids_BS[k, i]) for i in prefix + own] == list(e.enc.ids)
        assert [int(batch.position_BS[k, i]) for i in prefix + own] == list(range(len(e.enc.ids)))
        slots = {i: int(batch.slot_BS[k, i]) for i in prefix + own if batch.slot_BS[k, i] >= 0}
        assert sorted(slots.values()) == sorted(e.enc.prompt_slot)
        assert int(batch.position_BS[k, t]) == e.enc.target_pos
    assert batch.n_tokens == sum(len(e.enc.ids) for e in ex)
    assert batch.ids_BS.shape[1] <= 12 and batch.ids_BS.numel() < 4 * max(len(e.enc.ids) for e in ex)
    rows = list(zip(batch.prompt_rows_N.tolist(), batch.prompt_pos_N.tolist()))
    assert all(batch.slot_BS[r, p] == s for (r, p), s in zip(rows, batch.prompt_slots_N.tolist()))
    assert len(rows) == int((batch.slot_BS >= 0).sum())


def test_step_forwards_fill_the_padded_budget_and_agree_across_ranks():
    ex = rows_with_prefix(50, 0, 6, 0, [1, 2, 1, 3, 1, 1, 2, 1, 9, 1, 1, 1, 2, 1, 1, 1], seed=3)
    longest = max(len(e.enc.ids) for e in ex)  # 15
    # one rank, micro 4: four padded micro-batches of up to 4 x 15 positions; packed, 16 rows fit in 1-2
    groups = step_forwards([ex], 0, 4, 64)
    assert [e for g in groups for e in g] == ex  # every row once, in order
    assert len(groups) < 4 and all(packed_size(g, 64) <= 4 * longest for g in groups)
    # two ranks whose shares need different counts run as many forwards each
    short, mixed = ex[:8], [ex[8]] * 4 + ex[9:13]
    n = [len(forward_groups(r, 2 * longest, 64)) for r in (short, mixed)]
    assert n[0] < n[1]
    per_rank = [step_forwards([short, mixed], r, 2, 64) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == n[1]
    assert [e for g in per_rank[0] for e in g] == short and all(g for g in per_rank[0])
    # a budget of one row per forward is the padded layout's count
    assert len(forward_groups(ex, 1, 64)) == len(ex)


@pytest.mark.parametrize("seed", range(6))
def test_forward_groups_stay_within_budget(seed):
    """Random rows and small bins (so bin padding matters): the same groups as the exact rule computed
    the slow way (a group ends before the first row whose addition takes its packed size over the
    budget), every group within the budget or a single row, all rows once and in order."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 14, (24,), generator=g).tolist()
    ex = rows_with_prefix(50, 0, int(torch.randint(0, 5, (1,), generator=g)), 0, lengths, seed=seed)
    budget, capacity = int(torch.randint(10, 60, (1,), generator=g)), int(torch.randint(8, 24, (1,), generator=g))
    groups = forward_groups(ex, budget, capacity)
    exact, cur = [], []
    for e in ex:
        if cur and packed_size(cur + [e], capacity) > budget:
            exact, cur = exact + [cur], []
        cur.append(e)
    assert groups == exact + [cur]
    assert [e for grp in groups for e in grp] == ex
    assert all(len(grp) == 1 or packed_size(grp, capacity) <= budget for grp in groups)
    assert len(groups) <= len(ex)


def test_mask_sees_own_row_and_prefix_only():
    position = torch.tensor([[0, 1, 2, 3, 2, 3, 0]])
    segment = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    m = packed_attention_mask(position, segment)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0, 0],
                 [1, 1, 0, 0, 1, 0, 0],
                 [1, 1, 0, 0, 1, 1, 0],
                 [0, 0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", [(3, 2, 64), (6, 0, 64), (0, 0, 64), (3, 1, 12)])
def test_packed_equals_padded(family_dirs, family, attn, layout):
    """Logits, loss and the prompt gradient of a packed batch equal the padded batch's, for prefixes
    of prompts and anchors, none at all, and bins small enough to need several."""
    from transformers import AutoModelForCausalLM

    prefix_slots, anchors, capacity = layout
    hf = AutoModelForCausalLM.from_pretrained(family_dirs[family], attn_implementation=attn)
    bb = HFBackbone(hf)
    V = bb.word_embeddings_VH.shape[0]
    ex = rows_with_prefix(V, 0, prefix_slots, anchors, [4, 1, 6, 2, 3], seed=len(family))
    m = max(len(e.enc.prompt_slot) for e in ex)
    torch.manual_seed(0)
    enc = PromptEncoder("lstm", m, bb.hidden_size)
    model = PTuningModel(bb, enc, None)
    padded, packed = collate(ex, 0), collate(ex, 0, pack_to=capacity)
    assert packed.ids_BS.numel() < padded.ids_BS.numel()
    grads, logits = [], []
    for batch in (padded, packed):
        table = enc().detach().requires_grad_()
        out = model.logits(batch, table)
        torch.nn.functional.cross_entropy(out, batch.label_E).backward()
        logits.append(out.detach())
        grads.append(table.grad)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    # the fused splice and the oracle build the same packed input
    table = enc().detach()
    model.frozen.splice_kind = "reference"
    torch.testing.assert_close(model.logits(packed, table), logits[1], rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return default_backbone(tmp_path_factory.mktemp("tiny") / "backbone")


def test_trainer_losses_packed_vs_padded(tiny_dir, tmp_path):
    """The launcher's loop with packing on (the hf default) and off: the same losses step by step
    and the same predictions (the default template has prompt tokens before and after the input)."""
    runs = {}
    for mode in ("on", "off"):
        cfg = from_dict({}, {"model.path": str(tiny_dir), "train.output_dir": str(tmp_path / mode),
                             "train.log_every": 1, "train.max_steps": 6, "data.packing": mode})
        res = train(cfg, log=lambda *a: None)
        losses = [json.loads(line)["loss"] for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = (losses, res["ptuning"])
    assert runs["on"][0] == pytest.approx(runs["off"][0], rel=1e-5, abs=1e-6)
    assert runs["on"][1] == runs["off"][1]


def test_packing_refuses_attention_without_custom_masks(family_dirs):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(family_dirs["gpt2"])
    hf.config._attn_implementation = "flash_attention_2"  # what a GPU config may ask for
    bb = HFBackbone(hf)
    ex = rows_with_prefix(bb.word_embeddings_VH.shape[0], 0, 2, 0, [2, 3], suffix_slots=())
    model = PTuningModel(bb, PromptEncoder("mlp", 2, bb.hidden_size), None)
    with pytest.raises(ConfigError, match="data.packing.*flash_attention_2"):
        model.logits(collate(ex, 0, pack_to=64))


def test_packing_config_errors(tiny_dir):
    with pytest.raises(ConfigError, match="data.packing"):
        from_dict({}, {"data.packing": "sometimes"})
    # both backends pack by default (megatron: tests/dist/test_megatron_packing.py)
    assert from_dict({}, {"data.packing": "on", "model.backend": "megatron"}).pack_to == 256
    assert from_dict({}, {"model.backend": "megatron"}).pack_to == 256
    assert from_dict({}, {"data.max_seq_len": 96}).pack_to == 96
    assert from_dict({}, {"data.packing": "off"}).pack_to is None
