"""Runs the training recipe as the launcher does, plus records for the tests: partition sizes after
set-up, encoder gradients at chosen steps, the final encoder, per rank. It observes the recipe by
overriding two of its stages (after ``parallelize``; ``optimizer_step``, where the encoder's
gradients are final), and DeepSpeed by wrapping two of its methods.

    torchrun --nproc_per_node 2 tests/workers/dist_worker.py --record DIR --grad_steps 1,3 <train.py flags>
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ptuning_dist.cli.common import quiet_libraries  # noqa: E402
from ptuning_dist.cli.train import parse  # noqa: E402
from ptuning_dist.parallel.zero import partition_sizes  # noqa: E402
from ptuning_dist.train.recipe import PTuningRecipe  # noqa: E402


BLOCKS = ("GPT2Block", "LlamaDecoderLayer", "GPTNeoXLayer", "TransformerLayer")  # HF families, megatron


def main():
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--record", required=True)
    pre.add_argument("--grad_steps", default="1,3")
    mine, rest = pre.parse_known_args()
    cfg = parse(rest)
    grad_steps = {int(s) for s in mine.grad_steps.split(",") if s}
    rec = {"grads": {}, "params": {}}

    from ptuning_dist.train import evaluate as evaluate_mod

    predict = evaluate_mod.predict

    def recorded_predict(*a, **k):  # every evaluation's predictions, in order
        preds = predict(*a, **k)
        rec.setdefault("predictions", []).append(preds)
        return preds
    evaluate_mod.predict = recorded_predict

    class Recorded(PTuningRecipe):
        def batches(self, step):  # positions each step's forwards compute (padding and packing show here)
            out = super().batches(step)
            rec.setdefault("positions", {})[step] = sum(b.ids_BS.numel() for b in out)
            rec.setdefault("packed", {})[step] = all(b.position_BS is not None for b in out)
            rows = [int(s.max()) for b in out if b.segment_BS is not None for s in b.segment_BS]  # host tensors
            rec["max_rows_per_bin"] = max([rec.get("max_rows_per_bin", 0)] + rows)
            return out

        def parallelize(self):
            super().parallelize()
            self.after_setup(self.model, self.encoder, self.par.engine)

        def optimizer_step(self, step):
            self.after_backward(step, self.encoder)
            super().optimizer_step(step)

        def after_setup(self, model, encoder, engine):
            rec["partitions"] = partition_sizes(model.frozen)
            # what the shard-wise loader read on this rank (hf backend partitioned: the plan's fill;
            # the megatron backend: its stage import)
            rec["load_report"] = self.plan.load_report or getattr(model.backbone, "load_report", None)
            rec["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rec["_frozen"] = model.frozen
            rec["checkpointed_blocks"] = sum(type(m).__name__ == "CheckpointWrapper" for m in model.frozen.modules())
            cfg_m = getattr(model.backbone.model, "config", None)
            if getattr(cfg_m, "recompute_granularity", None) == "full":  # megatron's recompute
                rec["checkpointed_blocks"] = len(model.backbone.model.decoder.layers)
            # forwards of this stage's first block during training steps: doubled by a real recompute
            rec["block_forwards"] = 0
            blocks = [m for m in model.frozen.modules() if type(m).__name__.endswith(BLOCKS)]  # FSDP2 renames FSDP<Block>

            def count(*_):
                if model.training:
                    rec["block_forwards"] += 1
            blocks[0].register_forward_hook(count)
            if engine is not None and hasattr(engine.optimizer, "release_backward_leftovers"):
                # ZeRO-3: what is still gathered when the step's backwards are done, before the
                # loop's safety net releases leftovers (hooks that never fired)
                leftovers = engine.optimizer.release_backward_leftovers
                rec["gathered_before_release"] = []
                # the weights FrozenLM's own forward gathers (embeddings, head, returned biases)
                rec["external_numel"] = sum(p.ds_numel for p in model.backbone.external_weights())

                held = {id(p) for p in model.backbone.external_weights()}
                rec["layers_gathered_before_release"] = []

                def observed():  # inside the step's hold: the external weights are gathered on purpose
                    rec["gathered_before_release"].append(sum(p.data.numel() for p in model.frozen.parameters()))
                    rec["layers_gathered_before_release"].append(
                        sum(p.data.numel() for p in model.frozen.parameters() if id(p) not in held))
                    leftovers()
                engine.optimizer.release_backward_leftovers = observed
                # how often each external weight (embedding table, head, ...) is gathered per step:
                # counted as its releases (AVAILABLE -> partitioned), which every gather ends with
                from deepspeed.runtime.zero.partition_parameters import Init, ZeroParamStatus

                names = {id(p): n for n, p in model.frozen.named_parameters()}
                watched = {id(p) for p in model.backbone.external_weights()}
                rec["_releases"], rec["gathers"] = {}, {}
                partition = Init._partition

                rec["_all_releases"], rec["all_gathers"] = [0], {}

                def counting(self, param_list, *a, **k):
                    for p in param_list:
                        if id(p) in names and p.ds_status == ZeroParamStatus.AVAILABLE:
                            rec["_all_releases"][0] += 1  # every frozen weight's gathers (zero3_gather)
                        if id(p) in watched and p.ds_status == ZeroParamStatus.AVAILABLE:
                            rec["_releases"][names[id(p)]] = rec["_releases"].get(names[id(p)], 0) + 1
                    return partition(self, param_list, *a, **k)
                Init._partition = counting
            rec["encoder_numel"] = 0 if encoder is None else sum(p.numel() for p in encoder.parameters())
            rec["encoder_init"] = {} if encoder is None else {k: v.clone() for k, v in encoder.state_dict().items()}

        def after_backward(self, step, encoder):
            if "_releases" in rec:  # ZeRO-3: the gathers of the external weights in this step
                rec["gathers"][step] = dict(rec["_releases"])
                rec["_releases"].clear()
                rec["all_gathers"][step], rec["_all_releases"][0] = rec["_all_releases"][0], 0
                rec["frozen_count"] = len(list(rec["_frozen"].parameters()))
            if step in grad_steps:
                if encoder is not None:  # pipeline stages after the first have none
                    rec["grads"][step] = {n: p.grad.clone() for n, p in encoder.named_parameters()}
                    rec["params"][step] = {n: p.detach().clone() for n, p in encoder.named_parameters()}
                # frozen parameters holding a gradient (none may: only the encoder trains)
                rec.setdefault("frozen_grads", {})[step] = [n for n, p in rec["_frozen"].named_parameters()
                                                            if p.grad is not None or p.requires_grad]
                # elements of frozen weights materialised on this rank after the backward
                rec.setdefault("materialised", {})[step] = {n: p.data.numel() for n, p in rec["_frozen"].named_parameters()
                                                            if p.data.numel()}
                # FSDP2 registers sharded DTensors when resharded, plain tensors while gathered
                rec.setdefault("not_dtensor", {})[step] = sum(not hasattr(p, "to_local")
                                                              for p in rec["_frozen"].parameters())

    quiet_libraries()
    Recorded(cfg, log=lambda *a: None).run()
    rank = int(os.environ.get("RANK", 0))
    out = Path(mine.record)
    out.mkdir(parents=True, exist_ok=True)
    rec.pop("_frozen")
    rec.pop("_releases", None)
    rec.pop("_all_releases", None)
    torch.save(rec, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
