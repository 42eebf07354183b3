"""Under torchrun: this rank's stage loaded from a torch_dist checkpoint (``megatron_dist.load_stage``)
against the direct shard-wise import of the Hugging Face directory it was converted from, at the
TP x PP given (world = tp x pp x dp); rank r writes OUT/rank{r}.json.

    torchrun --nproc_per_node 4 tests/workers/torch_dist_worker.py HF_DIR TORCH_DIST_DIR TP PP OUT
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    hf_dir, td_dir, tp, pp, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    from ptuning_dist.parallel import launch

    launch.init(need_group=True)
    launch.init_model_parallel(tp, pp)
    from megatron.core import parallel_state as ps

    from ptuning_dist.backbone.megatron_dist import load_stage
    from ptuning_dist.backbone.megatron_import import build_stage

    coords = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
    direct, _ = build_stage(hf_dir, torch.float32, tp, coords[0], pp, coords[1])
    loaded, report = load_stage(td_dir, torch.float32, tp, coords[0], pp, coords[1])
    a, b = direct.state_dict(), loaded.state_dict()
    keys = sorted(k for k in a if not k.endswith("_extra_state"))
    unequal = [k for k in keys if not torch.equal(a[k], b[k])]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"coords": coords, "keys": keys, "unequal": unequal, "report": report}))
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
