"""Thin entry point: `python launchers/predict.py --help` (installed: `ptuning-predict`); the work is in
ptuning_dist.cli.predict."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from ptuning_dist.cli.predict import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
