"""megatron-core 0.16 on CPU: the CUDA assumptions it makes, bypassed in one place.

Applied by ``enable()`` only when there is no GPU; each patch checks that the upstream object it
replaces still looks as expected and raises an ``UpstreamError`` naming it if not (the megatron
tests fail if megatron-core changes them).

1. ``GlobalMemoryBuffer.get_tensor`` allocates its scratch buffer on ``torch.cuda.current_device()``
   (used by the local-spec attention for its baddbmm input): allocate on the CPU instead.
2. ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to ``torch.cuda.current_device()`` on first use:
   the same computation, left on the CPU.
3. The model-parallel RNG tracker (``get_cuda_rng_tracker``) forks the CUDA generator around
   attention dropout and weight init: a CPU tracker forks the CPU generator the same way (a named
   state per stream, restored after the ``with`` block), so seeded runs stay reproducible.
4. Full recompute (``tensor_parallel.checkpoint``) saves and restores the CUDA generator's state
   around the recomputed forward: on the CPU there is none, the CPU state and the tracker's are
   still saved and restored by megatron itself.
5. The pipeline schedules and their p2p layer call ``torch.cuda.current_device()`` for receive
   buffers, ``torch.cuda.synchronize()`` after batched p2p, and make a token counter with
   ``device="cuda"``: those two modules see a ``torch`` whose CUDA calls mean the CPU. Only the
   name ``torch`` inside ``schedules.py`` and ``p2p_communication.py`` is rebound; torch itself and
   every other module are untouched.
6. ``dist_checkpointing`` (the ``torch_dist`` format, ``backbone/megatron_dist.py``): saving calls
   ``torch.cuda.synchronize()`` (``filesystem_async.preload_tensors``) and puts a failure flag on
   ``torch.cuda.current_device()`` (``state_dict_saver``); the fully parallel load wrapper
   synchronises (``fully_parallel``). Those three modules get the same CPU ``torch``.
"""
from __future__ import annotations

import contextlib

import torch

from ptuning_dist.errors import upstream

_ENABLED = False


class CpuRNGStatesTracker:
    """The subset of megatron's CudaRNGStatesTracker the models use, on the CPU generator."""

    def __init__(self):
        self.states_: dict[str, torch.Tensor] = {}

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}

    def get_states(self) -> dict:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            self.add(name, 1234)  # a deterministic stream even when nobody seeded it
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


_TRACKER = CpuRNGStatesTracker()


def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    import operator
    from functools import reduce

    required_len = reduce(operator.mul, tensor_shape, 1)
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < required_len:
        buf = self.buffer[(name, dtype)] = torch.empty(required_len, dtype=dtype, requires_grad=False)
    return buf[0:required_len].view(*tensor_shape)


def _cpu_get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if not self.rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    return emb[:, None, None, :]  # [seq, 1, 1, dim], as upstream


class _CpuCuda:
    """``torch.cuda`` as the pipeline code uses it, meaning the CPU."""

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(*_a, **_k) -> None:  # CPU p2p over gloo completes in wait()
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch:
    """``torch`` for the pipeline modules: the same module, with ``device="cuda"`` read as CPU."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)

    @staticmethod
    def tensor(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.tensor(*args, **kwargs)


def enable() -> bool:
    """Patch megatron-core for CPU execution (no-op with a GPU). Returns whether it patched."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return _ENABLED
    from megatron.core import tensor_parallel, utils
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rope
    from megatron.core.tensor_parallel import layers, random

    upstream(hasattr(utils.GlobalMemoryBuffer, "get_tensor"), "megatron-core's GlobalMemoryBuffer has no get_tensor")
    utils.GlobalMemoryBuffer.get_tensor = _cpu_get_tensor
    upstream(hasattr(rope.RotaryEmbedding, "get_freqs_non_repeated"),
             "megatron-core's RotaryEmbedding has no get_freqs_non_repeated")
    rope.RotaryEmbedding.get_emb = _cpu_get_emb
    for mod in (random, tensor_parallel, layers):
        upstream(hasattr(mod, "get_cuda_rng_tracker"),
                 f"megatron-core moved get_cuda_rng_tracker out of {mod.__name__}")
        mod.get_cuda_rng_tracker = lambda *a, **k: _TRACKER
    upstream(hasattr(random, "_get_cuda_rng_state") and hasattr(random, "_set_cuda_rng_state"),
             "megatron-core's recompute RNG helpers (_get/_set_cuda_rng_state) are gone")
    random._get_cuda_rng_state = lambda *a, **k: None
    random._set_cuda_rng_state = lambda *a, **k: None
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    from megatron.core.dist_checkpointing.strategies import filesystem_async, fully_parallel, state_dict_saver

    for mod in (schedules, p2p_communication, filesystem_async, state_dict_saver, fully_parallel):
        upstream(mod.torch is torch, f"megatron-core's {mod.__name__} no longer imports torch as a module name")
        mod.torch = _CpuTorch()
    _ENABLED = True
    return True
