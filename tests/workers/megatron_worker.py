"""Under torchrun with TP = world size: the imported megatron GPT-2 on the same input embeddings
as Hugging Face's own model; rank 0 writes the largest logit difference at the target positions.

    torchrun --nproc_per_node 2 tests/workers/megatron_worker.py HF_DIR OUT.json
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _wrong_mapping_logits(bb, hf, embeds, mask, target, tp):
    """The same forward after loading layer 0 with a plausible but wrong mapping: QKV rows left in
    HF's q|k|v order (GPT-2), or the fused [gate; up] matrix split naively across TP (LLaMA). A
    comparison against HF that could not tell these apart would be no check of the importer."""
    rank = dist.get_rank()
    layer = bb.gpt.decoder.layers[0]
    state = hf.state_dict()
    if hf.config.model_type == "gpt2":
        w = layer.self_attention.linear_qkv.weight
        naive = state["transformer.h.0.attn.c_attn.weight"].t().chunk(tp, dim=0)[rank]
    else:
        w = layer.mlp.linear_fc1.weight
        fused = torch.cat([state["model.layers.0.mlp.gate_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]])
        naive = fused.chunk(tp, dim=0)[rank]
    if tp == 1 and hf.config.model_type != "gpt2":  # at TP=1 the fused matrix is not split: swap gate and up
        naive = torch.cat(naive.chunk(2, dim=0)[::-1])
    right = w.detach().clone()
    w.data.copy_(naive)
    wrong = bb.head_shard(bb.hidden_at(decoder_input(bb, embeds), mask, target))
    w.data.copy_(right)
    parts = [torch.empty_like(wrong) for _ in range(tp)]
    dist.all_gather(parts, wrong)
    return torch.cat(parts, dim=-1)[:, : hf.config.vocab_size]


def decoder_input(bb, embeds_BSH):
    """HF adds learned positions inside its forward; megatron's decoder takes them added, [s, b, h]."""
    pos = bb._position_table()
    if pos is not None:
        embeds_BSH = embeds_BSH + pos[: embeds_BSH.shape[1]].detach().unsqueeze(0)
    return embeds_BSH.transpose(0, 1).contiguous()


def splice_check(bb, ids):
    """The fused splice on this TP rank's shard (prompt rows and positions on TP rank 0 only, then
    the TP sum) against the reference path: forward and table gradient bit-equal, the table
    gradient the same on every TP rank."""
    from ptuning_dist.ops.splice import slot_map

    B, S = ids.shape
    g = torch.Generator().manual_seed(1)
    rows, pos, slots = torch.tensor([0, 0, 2, 2, 2]), torch.tensor([0, 3, 1, 2, 6]), torch.tensor([1, 0, 2, 1, 0])
    table = torch.randn(3, bb.hidden_size, generator=g)
    grad_SBH = torch.randn(S, B, bb.hidden_size, generator=g)
    outs, grads = [], []
    for fused in (True, False):
        t = table.clone().requires_grad_(True)
        out = bb.splice(ids, slot_map(rows, pos, slots, B, S), t) if fused else bb.reference_splice(ids, rows, pos, slots, t)
        out.backward(grad_SBH)
        outs.append(out.detach())
        grads.append(t.grad)
    everyone = [torch.empty_like(grads[0]) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, grads[0])
    return {"splice_equal": torch.equal(*outs), "splice_grad_equal": torch.equal(*grads),
            "splice_grad_same_on_tp_ranks": all(torch.equal(x, everyone[0]) for x in everyone),
            "splice_shape": list(outs[0].shape)}


def scoring_check(bb, hf):
    """Candidate answers of several tokens through FrozenLM on this TP layout (the vocabulary-
    parallel head gathered, log-softmax, per-candidate sums) against HF's own log-probabilities."""
    from ptuning_dist.data.collate import Example, collate
    from ptuning_dist.model import FrozenLM
    from ptuning_dist.prompt.template import Encoded

    ctxs, cands = [(1, 2, 3, 4), (7, 8, 9)], [((5, 6, 7), (9,), (11, 3)), ((3, 4), (8, 2))]
    batch = collate([Example(Encoded(c, (), (), -1), 0, "g", 0, cand_ids=k) for c, k in zip(ctxs, cands)], pad_id=0)
    frozen = FrozenLM(bb, None)
    with torch.no_grad():
        ours = frozen(batch.ids_BS, batch.attention_mask_BS, batch.slot_BS, batch.prompt_rows_N, batch.prompt_pos_N,
                      batch.prompt_slots_N, batch.target_pos_E, torch.zeros(0, bb.hidden_size), batch.target_row_E,
                      None, None, batch.score_tokens_Q, batch.score_seq_Q, batch.cand_valid_XK, batch.cand_len_XK)
        diff = 0.0
        for x, (ctx, ks) in enumerate(zip(ctxs, cands)):
            for k, c in enumerate(ks):
                logp = torch.log_softmax(hf(input_ids=torch.tensor([ctx + c])).logits[0].float(), -1)
                ref = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(c))
                diff = max(diff, abs(float(ours[x, k]) - ref))
    return {"scoring_diff": diff, "scoring_pad_is_inf": bool(ours[1, 2] == float("-inf"))}


def main():
    hf_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from ptuning_dist.backbone.megatron import MegatronBackbone

    tp = dist.get_world_size()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    bb = MegatronBackbone.from_pretrained(hf_dir)
    g = torch.Generator().manual_seed(0)
    V, H = hf.config.vocab_size, hf.config.hidden_size
    ids = torch.randint(0, V, (3, 7), generator=g)
    embeds = hf.get_input_embeddings().weight[ids] + 0.1 * torch.randn(3, 7, H, generator=g)  # "spliced"
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    target = torch.tensor([6, 4, 2])
    cands = torch.tensor([0, V - 1, V // 2, 7])  # both ends of the vocabulary, so of each TP shard
    with torch.no_grad():
        hidden = bb.hidden_at(decoder_input(bb, embeds), mask, target)
        shard = bb.head_shard(hidden)
        parts = [torch.empty_like(shard) for _ in range(tp)]
        dist.all_gather(parts, shard)
        ours = torch.cat(parts, dim=-1)[:, :V]
        ref = hf(inputs_embeds=embeds, attention_mask=mask).logits[torch.arange(3), target]
        head_full = bb.head(hidden, None)
        head_cands = bb.head(hidden, cands)
        no_prompt = torch.zeros(0, dtype=torch.long)
        embed_diff = (bb.reference_splice(ids, no_prompt, no_prompt, no_prompt, torch.zeros(0, H))
                      - decoder_input(bb, hf.get_input_embeddings().weight[ids])).abs().max()
        wrong_diff = float((_wrong_mapping_logits(bb, hf, embeds, mask, target, tp) - ref).abs().max())
    checks = {**splice_check(bb, ids), **scoring_check(bb, hf)}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({**checks, "max_abs_diff": float((ours - ref).abs().max()), "tp": tp,
                                         "wrong_mapping_diff": wrong_diff,
                                         "head_full_diff": float((head_full - ref).abs().max()),
                                         "head_cands_diff": float((head_cands - ref[:, cands]).abs().max()),
                                         "embed_diff": float(embed_diff),
                                         "ref_scale": float(ref.abs().max()), "hidden": H,
                                         "shard_rows": bb.gpt.embedding.word_embeddings.weight.shape[0]}))
    # every rank done with every group before any tears down (once, in CI, rank 1 aborted at exit with
    # "terminate called without an active exception" while rank 0 was still writing)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
