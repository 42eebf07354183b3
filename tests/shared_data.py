"""Where the real data lives (../shared/data, see its README). A plain module, not conftest.py: pytest
imports every folder's conftest.py under the one name ``conftest`` (tests/gpu has its own), so
``from conftest import ...`` gets whichever was collected last."""
from __future__ import annotations

from pathlib import Path

FEWGLUE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fewglue"
