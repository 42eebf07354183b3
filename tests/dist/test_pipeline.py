"""Pipeline parallelism (megatron-core 1F1B) on 2-4 gloo ranks against the single-process HF run."""
from __future__ import annotations

import sys

import pytest
import torch
from distutil import (COMMON, LLAMA_RTE, ROOT, WORKER, assert_matches_reference, assert_partitions_predicted,
                      losses, record, torchrun)


@pytest.mark.parametrize("tp,pp,world", [(1, 2, 2), (1, 2, 4), (2, 2, 4)])  # PP=2; PP=2 x DP=2; TP=2 x PP=2
def test_pipeline_matches_single_process(backbone, reference, tmp_path, tp, pp, world):
    """The default GPT-2 is tied: the last stage's head must hold the real word embeddings (a
    random or zeroed copy would change every loss). Encoder gradients live on stage 0 only."""
    torchrun(world, WORKER, "--record", tmp_path / "rec", "--model", backbone, "--output_dir", tmp_path,
             "--backend", "megatron", "--tp", tp, "--pp", pp, *COMMON)
    assert_matches_reference(reference, tmp_path, ranks=(0,))
    last = record(tmp_path, world - 1)  # megatron's rank order: TP fastest, then DP, PP slowest
    assert last["trainable"] == last["encoder_numel"] == 0 and not last["grads"], "an encoder beyond stage 0"
    assert record(tmp_path, 0)["trainable"] == record(tmp_path, 0)["encoder_numel"] > 0
    for r in range(world):
        assert record(tmp_path, r)["frozen_grads"][3] == [], f"rank {r}: a frozen weight got a gradient"
    assert_partitions_predicted(tmp_path, backbone, world, tp, pp)


def test_pipeline_llama_untied_head(family_dirs, llama_reference, tmp_path):
    """LLaMA (untied lm_head, RoPE on every stage, GQA) on RTE at PP=2 against HF in one process."""
    torchrun(2, WORKER, "--record", tmp_path / "rec", "--output_dir", tmp_path, "--model", family_dirs["llama"],
             "--backend", "megatron", "--pp", 2, *LLAMA_RTE, *COMMON)
    assert_matches_reference(llama_reference, tmp_path, steps=(3,))
    assert_partitions_predicted(tmp_path, family_dirs["llama"], 2, pp=2)  # output_layer on the last stage


@pytest.mark.parametrize("layout,blocks", [(["--tp", 2], 2), (["--pp", 2], 1)], ids=["tp2", "pp2"])
def test_megatron_recompute_bit_identical(backbone, tmp_path, layout, blocks):
    """megatron's full recompute at TP=2 and PP=2: the same bits, and every rank's layers really run
    twice (``blocks`` layers on each rank's stage)."""
    runs = {}
    for ac in ("false", "true"):
        out = tmp_path / ac
        torchrun(2, WORKER, "--record", out / "rec", "--model", backbone, "--output_dir", out, "--backend", "megatron",
                 *layout, "--activation_checkpointing", ac, *COMMON)
        runs[ac] = out
    assert losses(runs["true"]) == losses(runs["false"])
    on, off = record(runs["true"], 0), record(runs["false"], 0)
    for k, g in off["grads"][3].items():
        assert torch.equal(on["grads"][3][k], g), k
    for r in (0, 1):
        on, off = record(runs["true"], r), record(runs["false"], r)
        assert on["checkpointed_blocks"] == blocks and off["checkpointed_blocks"] == 0
        assert on["block_forwards"] == 2 * off["block_forwards"] > 0, (on["block_forwards"], off["block_forwards"])


COPA = ["--task", "copa", "--max_seq_len", 96, "--test_split", "dev"]  # choices of several sentencepiece tokens


@pytest.fixture(scope="module")
def copa_reference(family_dirs, tmp_path_factory):
    from distutil import run

    out = tmp_path_factory.mktemp("copa_ref")
    run([sys.executable, WORKER, "--record", out / "rec", "--output_dir", out, "--model", family_dirs["llama"],
         "--splice", "reference", *COPA, *COMMON])
    return out


@pytest.mark.parametrize("layout", [["--backend", "megatron", "--pp", 2], ["--backend", "megatron", "--tp", 2],
                                    ["--ds_config", ROOT / "ds_configs" / "zero3.json"]], ids=["pp2", "tp2", "zero3"])
def test_copa_candidate_scoring_matches_single_process(family_dirs, copa_reference, tmp_path, layout):
    """COPA's two answers of several tokens, every token's log-probability summed, the candidates of
    the micro-batch in one forward: the megatron backend at PP=2 (scores on the last stage) and TP=2
    (the vocabulary-parallel head gathered), and the hf backend under ZeRO-3 at DP=2, against the HF
    backend in one process."""
    torchrun(2, WORKER, "--record", tmp_path / "rec", "--output_dir", tmp_path, "--model", family_dirs["llama"],
             *layout, *COPA, *COMMON)
    # the loss is a cross-entropy over sums of ~10-20 token log-probs (|loss| ~ 10): float order
    # across TP ranks and stages moves it by up to ~2e-5 (seen 1.5e-5), relative 2e-6
    assert_matches_reference(copa_reference, tmp_path, steps=(3,), tol=1e-4)
