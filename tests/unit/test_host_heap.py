"""The host heap policy (parallel.host_malloc) a CPU run resolves, and where it is recorded."""
from __future__ import annotations

import pytest
import torch

from ptuning_dist.config import from_dict
from ptuning_dist.errors import ConfigError
from ptuning_dist.parallel.heap import HostHeap


@pytest.mark.parametrize("setting,partitioned,mode", [(None, False, "off"), (None, True, "trim"),
                                                      ("trim", False, "trim"), ("off", True, "off"),
                                                      ("mmap", False, "mmap")])
def test_host_heap_mode(setting, partitioned, mode):
    """auto (the default) trims the heap each step only where ZeRO-3/FSDP2 gathers."""
    cfg = from_dict({}, {} if setting is None else {"parallel.host_malloc": setting})
    # mode_for, not HostHeap(): constructing one would pin this test process's mmap threshold
    assert HostHeap.mode_for(cfg.parallel.host_malloc, torch.device("cpu"), partitioned) == mode
    assert HostHeap.mode_for(cfg.parallel.host_malloc, torch.device("meta"), partitioned) == "off"  # not host memory
    assert cfg.to_dict()["parallel"]["host_malloc"] == (setting or "auto")  # what run_config.json records
    with pytest.raises(ConfigError, match="parallel.host_malloc: 'always' is not auto, mmap, trim or off"):
        from_dict({}, {"parallel.host_malloc": "always"})
