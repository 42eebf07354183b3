"""The host heap policy of a CPU run (``parallel.host_malloc``): chosen before the backbone loads."""
from __future__ import annotations

import torch

from ptuning_dist.config import HostMalloc


class HostHeap:
    """Keeps glibc's heap from growing without bound under ZeRO-3 on CPU.

    ZeRO-3 gathers and frees multi-MiB parameter buffers every layer. glibc raises its mmap
    threshold after each such free, so later buffers come from the heap, which fragments and is
    not returned: measured here (benchmarks/zero_memory.py), a GPT-2-small backbone at DP=2 grew
    ~150 MiB of RSS per step, to twice ZeRO-0's, with no parameter left gathered.
    ``parallel.host_malloc`` (``--host_malloc``) picks the remedy (CPU runs only; GPU memory has its
    own allocator):

    - ``auto`` (default): ``trim`` when the frozen weights are partitioned over ranks (ZeRO-3 or
      FSDP2 at DP > 1), else ``off``: without per-layer gathers there is nothing to fragment, and
      pinning the threshold only page-faults every large activation (one process, measured in
      benchmarks/vs_peft.py: steps 1.4x slower on the longer task). Under ZeRO-3 ``trim`` is the
      middle (benchmarks/vs_peft.py, 2 ranks: 1.3-1.4x PEFT's steps/s at ~0.65x its peak memory;
      ``off`` 1.6-1.7x at ~0.8x; ``mmap`` 0.9-1.0x at ~0.5x).
    - ``mmap``: pin the mmap threshold at 1 MiB (= ``MALLOC_MMAP_THRESHOLD_=1048576``, which
      glibc only reads at start-up): buffers >= 1 MiB are mmapped and returned on free, and ZeRO-3's
      RSS stays flat (within ~1.2x ZeRO-0's, instead of 2x); every gather page-faults fresh pages
      (steps 30-60% slower than ``off`` here). The leanest.
    - ``trim``: ``malloc_trim(0)`` after every step: the heap is returned each step, so it cannot
      grow across steps, but regrows within one (peak ~1.5x ZeRO-0's in benchmarks/zero_memory.py).
    - ``off``: glibc's defaults (fastest steps, peak ~2x ZeRO-0's under ZeRO-3 here).
    """

    def __init__(self, mode: HostMalloc, device: torch.device, partitioned: bool = False):
        self.mode = self.mode_for(mode, device, partitioned)
        self.libc = None
        if self.mode != "off":
            import ctypes
            import ctypes.util

            try:
                self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                self.libc.malloc_trim  # noqa: B018 - glibc only
            except (OSError, AttributeError):
                self.libc, self.mode = None, "off"
        if self.mode == "mmap":
            self.libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD

    @staticmethod
    def mode_for(mode: HostMalloc, device: torch.device, partitioned: bool) -> str:
        """``parallel.host_malloc`` resolved for this run (``auto`` -> ``trim`` or ``off``)."""
        if mode == "auto":
            mode = "trim" if partitioned else "off"
        return mode if device.type == "cpu" else "off"

    def after_step(self) -> None:
        """Called once per optimizer step (``trim``: return the heap pages the step's gathers freed)."""
        if self.mode == "trim":
            self.libc.malloc_trim(0)
