"""tests/test_slurm.py puts this directory on PYTHONPATH: every ``launchers/train.py`` process then
writes, as it exits, the rank, world size, local rank and master it trained with (after the
launcher's or the srun discovery's variables are in place: ptuning_dist.parallel.launch.init puts
the srun-derived ones into os.environ) to ``$PTD_TEST_RECORD_DIR/rank.<pid>.json``."""
import atexit
import json
import os
import sys


def _record() -> None:
    if not (sys.argv and sys.argv[0].endswith("train.py")):
        return
    rec = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                          "GROUP_RANK", "SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID")}
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        rec["dist_rank"], rec["dist_world"] = dist.get_rank(), dist.get_world_size()
    path = os.path.join(os.environ["PTD_TEST_RECORD_DIR"], f"rank.{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(path + ".tmp", path)


if os.environ.get("PTD_TEST_RECORD_DIR"):
    atexit.register(_record)
