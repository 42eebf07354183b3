"""The per-rank memory model (ptuning_dist/parallel/memory.py) against references: Hugging Face's
own parameter counts, the megatron importer's shard shapes and megatron's rank order; the dist tier compares
the partitions real TP, PP, FSDP2 and ZeRO-3 runs record, name by name, on every rank."""
from __future__ import annotations

import subprocess
import sys
from math import prod
from pathlib import Path

import pytest
import torch

from ptuning_dist.planning.memory import dp_held, layout_memory, rank_coords, stage_params
from ptuning_dist.planning.shape import ModelShape
from ptuning_dist.prompt.encoder import num_params

ROOT = Path(__file__).resolve().parents[2]


def hf_config(family: str, **over):
    """Tiny configs: an odd vocabulary (padded at TP 2 and 4), 4 layers (cut at PP 2 and 4), LLaMA
    with grouped-query attention (8 heads, 4 key/value groups)."""
    from transformers import GPT2Config, LlamaConfig

    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=1001, **over)
    return LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, max_position_embeddings=64, vocab_size=1001, **over)


# the last: config.json's head_dim (8) wider than hidden / heads (4), as some LLaMA-family checkpoints have
FAMILIES = [("gpt2", {}), ("llama", {"tie_word_embeddings": False}), ("llama", {"tie_word_embeddings": True}),
            ("llama", {"tie_word_embeddings": False, "head_dim": 8})]


@pytest.fixture(scope="module", params=FAMILIES, ids=["gpt2", "llama-untied", "llama-tied", "llama-head_dim"])
def hf_model(request):
    from transformers import AutoModelForCausalLM

    family, over = request.param
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf_config(family, **over))


def test_shape_from_config_dict_and_hf_param_count(hf_model, tmp_path):
    shape = ModelShape.from_hf_config(hf_model.config.to_dict())
    assert shape.hf_num_params() == sum(p.numel() for p in hf_model.parameters())
    hf_model.config.save_pretrained(tmp_path)  # the same from a model directory's config.json
    assert ModelShape.from_hf_config(tmp_path) == shape


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4), (4, 2)])
def test_shards_over_all_stages_and_tp_ranks_sum_to_hf_count(hf_model, tp, pp):
    """TP-split parameters counted on every TP rank, replicated ones once: the HF count + the
    vocabulary padding of each vocabulary-parallel table + the real head copy of a tied model at pp > 1."""
    shape = ModelShape.from_hf_config(hf_model.config.to_dict())
    total = sum(p.numel * (tp if p.tp_split else 1) for s in range(pp) for p in stage_params(shape, tp, pp, 1, s))
    pad_rows = shape.padded_vocab(tp) - shape.vocab
    has_output_layer = not shape.tied_embeddings or pp > 1
    extra = pad_rows * shape.hidden * (1 + has_output_layer)
    if shape.tied_embeddings and pp > 1:
        extra += shape.vocab * shape.hidden
    assert total == sum(p.numel() for p in hf_model.parameters()) + extra
    # layers are cut evenly and renumbered from 0 on every stage
    for s in range(pp):
        names = [p.name for p in stage_params(shape, tp, pp, 1, s)]
        assert {n.split(".")[2] for n in names if n.startswith("decoder.layers.")} == {str(i) for i in range(4 // pp)}
        assert ("embedding.word_embeddings.weight" in names) == (s == 0)
        assert ("decoder.final_layernorm.weight" in names) == (s == pp - 1)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_names_and_shapes_equal_the_importers_shard(hf_model, tp, pp, tmp_path):
    """Every rank's (name, shape) equals what the HF -> megatron importer reads for it."""
    from ptuning_dist.backbone.families import family
    from ptuning_dist.backbone.megatron_import import stage_tensors
    from ptuning_dist.backbone.safetensors_io import WeightFiles

    cfg = hf_model.config
    shape = ModelShape.from_hf_config(cfg.to_dict())
    hf_model.save_pretrained(tmp_path)
    with WeightFiles(tmp_path, torch.float32) as files:
        for tp_rank in range(tp):
            for s in range(pp):
                got = {n: tuple(t().shape) for n, t in
                       stage_tensors(family(shape.family), files.read, cfg, tp, tp_rank, pp, s).items()}
                want = {p.name: p.shape for p in stage_params(shape, tp, pp, 1, s)}
                assert got == want, (tp_rank, s)


def test_dp_partitioning_rules():
    for shape in [(148, 64), (3, 5), (5, 2), (64,), (1,)]:
        for dp in (1, 2, 3, 4):
            fsdp = [dp_held(shape, dp, r, "fsdp2") for r in range(dp)]
            assert sum(fsdp) == prod(shape)  # torch.chunk over dim 0: nothing lost, nothing doubled
            assert fsdp[0] == -(-shape[0] // dp) * (prod(shape) // shape[0])
            assert all(dp_held(shape, dp, r, "zero3") == -(-prod(shape) // dp) for r in range(dp))
            assert all(dp_held(shape, dp, r, "none") == prod(shape) for r in range(dp))
    assert [dp_held((3, 5), 4, r, "fsdp2") for r in range(4)] == [5, 5, 5, 0]  # a trailing rank may hold nothing
    with pytest.raises(ValueError):
        dp_held((4,), 2, 0, "zero2")


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 2), (2, 2, 2), (1, 4, 2), (4, 2, 1), (2, 3, 4)])
def test_rank_coords_follow_megatrons_order(tp, pp, dp):
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    index = {kind: {r: g.index(r) for g in gen.get_ranks(kind) for r in g} for kind in ("pp", "tp", "dp")}
    for rank in range(tp * pp * dp):
        assert rank_coords(rank, tp, pp, dp) == (index["pp"][rank], index["tp"][rank], index["dp"][rank])


def test_encoder_activation_and_gather_terms():
    shape = ModelShape.from_hf_config(hf_config("gpt2").to_dict())
    kw = dict(n_prompt=6, micro_batch=4, seq_len=32)
    ranks = layout_memory(shape, 2, 2, 2, partitioning="fsdp2", **kw)
    assert len(ranks) == 8
    n_enc = num_params("lstm", 6, shape.hidden)
    assert {r.encoder_bytes for r in ranks if r.pp_stage == 0} == {20 * n_enc}
    assert {r.encoder_bytes for r in ranks if r.pp_stage == 1} == {0}
    # one encoder per prompt group (prompt/batched.py): 41 LAMA relations hold 41 encoders
    many = layout_memory(shape, 2, 2, 2, partitioning="fsdp2", prompt_groups=41, **kw)
    assert {r.encoder_bytes for r in many if r.pp_stage == 0} == {41 * 20 * n_enc}
    assert all(r.frozen_bytes == 4 * sum(p.held for p in r.frozen) for r in ranks)
    assert all(r.gather_bytes > 0 for r in ranks)
    assert all(r.gather_bytes == 0 for r in layout_memory(shape, 2, 2, 2, **kw))
    assert all(r.gather_bytes == 0 for r in layout_memory(shape, 2, 2, 1, partitioning="fsdp2", **kw))
    # 1F1B: the first stage keeps more micro-batches in flight than the last
    assert ranks[0].activation_bytes > ranks[-1].activation_bytes
    plain, ckpt = (layout_memory(shape, dtype_bytes=2, checkpointing=c, **kw)[0] for c in (False, True))
    assert ckpt.activation_bytes < plain.activation_bytes
    big = layout_memory(shape, dtype_bytes=2, **{**kw, "micro_batch": 8})[0]
    assert big.activation_bytes == 2 * plain.activation_bytes  # linear in the micro batch
    assert big.step_bytes == big.frozen_bytes + big.encoder_bytes + big.activation_bytes + big.gather_bytes


def test_divisibility_refused():
    shape = ModelShape.from_hf_config(hf_config("llama").to_dict())  # 8 heads, 4 kv groups, 4 layers
    for tp, pp in [(8, 1), (1, 3)]:
        with pytest.raises(ValueError):
            stage_params(shape, tp, pp, 1, 0)
    with pytest.raises(ValueError):
        ModelShape.from_hf_config({"model_type": "gpt_neox"})


def test_module_is_pure():
    """No torch, megatron, DeepSpeed or process group behind it: a planner can call it anywhere."""
    code = ("import sys, ptuning_dist.planning.memory, ptuning_dist.planning.planner, ptuning_dist.cli.plan; "
            "print(sorted(k for k in ('torch', 'megatron', 'deepspeed', 'transformers') if k in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]", p.stdout


# The dist tier compares these predictions with every rank of real runs, name by name: see
# distutil.assert_partitions_predicted, called by the TP, PP, ZeRO-3 and FSDP2 tests.
