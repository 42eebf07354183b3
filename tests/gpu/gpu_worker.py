"""One training run of the real recipe, observed for the gpu tier (tests/gpu/gpuutil.py runs it):

    python tests/gpu/gpu_worker.py --record FILE [--sync_steps 2] [--grads_step 1] <train.py flags>

Records (JSON in FILE): the device, the process group's backend, the splice backend the op picks there,
the backbone's and the encoder's dtypes, the losses (metrics.jsonl), the encoder's gradients at
``--grads_step`` (FILE.grads.pt), each step's forward shapes, checkpointed blocks and block forwards,
and on CUDA the memory: allocated after set-up, the frozen bytes held, and the peak allocated over the
training steps (counters reset after set-up). ``--sync_steps``: those steps' ``train_step`` runs under
``torch.cuda.set_sync_debug_mode("error")``, so any host sync in them raises here, with its traceback.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ptuning_dist.cli.common import quiet_libraries  # noqa: E402
from ptuning_dist.cli.train import parse  # noqa: E402
from ptuning_dist.train.recipe import PTuningRecipe  # noqa: E402

BLOCKS = ("LlamaDecoderLayer", "TransformerLayer")  # hf, megatron


def main():
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--record", required=True)
    pre.add_argument("--sync_steps", default="")
    pre.add_argument("--grads_step", type=int, default=1)
    mine, rest = pre.parse_known_args()
    quiet_libraries()
    cfg = parse(rest)
    sync_steps = {int(s) for s in mine.sync_steps.split(",") if s}
    cuda = torch.cuda.is_available()
    rec = {"cuda": cuda, "shapes": {}, "sync_checked": [], "block_forwards": 0}
    grads = {}

    class Observed(PTuningRecipe):
        def parallelize(self):
            super().parallelize()
            from ptuning_dist.ops import splice as splice_op

            model, enc = self.model, self.encoder
            frozen = list(model.frozen.parameters())
            rec["device"] = str(self.D.device)
            rec["dist_backend"] = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
            rec["splice"] = splice_op._pick(self.D.device, cfg.model.splice)
            rec["backbone_dtype"] = str(frozen[0].dtype)
            rec["encoder_dtype"] = str(next(enc.parameters()).dtype)
            rec["frozen_bytes"] = sum(p.data.numel() * p.data.element_size() for p in frozen)
            rec["encoder_numel"] = sum(p.numel() for p in enc.parameters())
            rec["zero3"] = self.par.engine is not None and any(hasattr(p, "ds_numel") for p in frozen)
            rec["checkpointed_blocks"] = sum(type(m).__name__ == "CheckpointWrapper" for m in model.frozen.modules())
            if getattr(getattr(model.backbone.model, "config", None), "recompute_granularity", None) == "full":
                rec["checkpointed_blocks"] = len(model.backbone.model.decoder.layers)  # megatron's own recompute
            blocks = [m for m in model.frozen.modules() if type(m).__name__.endswith(BLOCKS)]

            def count(*_):
                if model.training:
                    rec["block_forwards"] += 1
            blocks[0].register_forward_hook(count)
            if cuda:
                torch.cuda.synchronize()
                rec["setup_allocated"] = torch.cuda.memory_allocated()
                rec["setup_peak"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

        def batches(self, step):
            out = super().batches(step)
            rec["shapes"][step] = [list(b.ids_BS.shape) for b in out]
            rec.setdefault("packed", {})[step] = all(b.position_BS is not None for b in out)
            return out

        def train_step(self, step):
            if step not in sync_steps:
                return super().train_step(step)
            torch.cuda.synchronize()  # whatever the earlier steps queued is done before the check starts
            torch.cuda.set_sync_debug_mode("error")
            try:
                loss = super().train_step(step)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            rec["sync_checked"].append(step)
            return loss

        def optimizer_step(self, step):
            if step == mine.grads_step:
                grads.update({n: p.grad.detach().float().cpu().clone() for n, p in self.encoder.named_parameters()
                              if p.grad is not None})
            super().optimizer_step(step)

        def finish(self):
            if cuda:
                torch.cuda.synchronize()
                rec["train_peak"] = torch.cuda.max_memory_allocated()
            return super().finish()

    result = Observed(cfg, log=lambda *a, **k: None).run()
    metrics = Path(cfg.train.output_dir) / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x]
    rec["losses"] = [r["loss"] for r in lines if "loss" in r]
    rec["steps_logged"] = [r["step"] for r in lines if "loss" in r]
    rec["eval_keys"] = sorted(result) if isinstance(result, dict) else None
    if os.environ.get("RANK", "0") == "0":
        Path(mine.record).parent.mkdir(parents=True, exist_ok=True)
        torch.save(grads, mine.record + ".grads.pt")
        Path(mine.record).write_text(json.dumps(rec))


if __name__ == "__main__":
    main()
