"""Thin entry point: `python launchers/plan.py --help`. The work is in ptuning_dist.plan_cli.plan_main."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from ptuning_dist.plan_cli import plan_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(plan_main())
