"""The embedding splice: vocabulary rows everywhere, prompt-table rows at prompt positions.

``splice_reference`` is the oracle, the paper's way in pure PyTorch: look every token up, then
insert the prompt rows from the flat (row, position, slot) plan the collator computed on the CPU
(no ``.nonzero()``, no host sync; rows may hold different numbers of prompt tokens). Gradient flows
only to the prompt table: the word embeddings are read detached, and prompt positions hold a
placeholder id (the pad id) that the splice overwrites, so no pseudo-token id indexes the vocabulary.

``ptuning::splice`` is the same splice fused into one pass, with a tensor-parallel mode. Why: the
oracle costs a full B x S x H lookup, then an out-of-place ``index_put`` that copies B x S x H
again; under megatron the lookup also runs as mask-multiply over the vocabulary shard before the
prompt rows are inserted. Here every output row is written exactly once, from the vocabulary
shard, from the prompt table or as zeros.

How: the prompt plan is a per-position slot map ``slot_BS`` (-1: a vocabulary row; m >= 0: row m
of the prompt table), built without a host sync by :func:`slot_map` from the collator's
(row, pos, slot) triplets. Position p = b * S + s gets

* ``weight_VH[id - vocab_start]`` if slot < 0 and the id lies in this shard, zeros if it does not;
* ``table_MH[slot]`` cast to the weight's dtype if ``write_prompt``, else zeros (under TP exactly
  one rank writes the prompt rows, so the following all-reduce sums each row once).

``pos_weight_TH`` (a learned position table, megatron's GPT-2 style) adds row ``pos_offset + s`` to
every position written (under TP pass it on the prompt-writing rank only); with ``position_BS`` (a
packed batch's per-token position ids, data/packing.py) row ``position_BS[b, s]`` instead. ``seq_first`` writes
[S, B, H] (megatron's layout) instead of [B, S, H]. ``seq_start``/``seq_len`` write only the
sequence chunk [seq_start, seq_start + seq_len) (sequence parallelism with a replicated table: each
rank writes its own chunk, its positions counted from ``seq_start``). The backward gives the
prompt table alone its gradient, in fp32: ``grad_table[m] = sum of grad_out over positions with
slot == m``, independent of ``write_prompt`` (so every TP rank computes the same gradient), summed
in a fixed order (no atomics), so the bits repeat run to run.

Backends (``backend=``): ``"fused"`` picks by device: the C++ kernel ``splice_cpu.cpp`` on CPU
(built on first use by ``torch.utils.cpp_extension.load`` into TORCH_EXTENSIONS_DIR), Triton
(``splice_triton.py``) on CUDA; each falls back to the reference with one warning. ``"reference"``
is the op in pure torch (no data-dependent shapes), bit-exact with ``splice_reference`` when
unsharded. ``"triton"`` forces the Triton kernels (on CPU tensors only under
``TRITON_INTERPRET=1``, set before triton is imported).
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("fused", "reference", "triton")
_warned: set[str] = set()
_cpu_ext = None  # None: not built yet; False: the build failed


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def splice_reference(ids_BS: Tensor, prompt_rows_N: Tensor, prompt_pos_N: Tensor, prompt_slots_N: Tensor,
                     word_embeddings_VH: Tensor, table_MH: Tensor) -> Tensor:
    """The oracle: embeds_BSH in the word embeddings' dtype. Costs one embedding lookup (B x S x H)
    plus an out-of-place ``index_put`` of N rows; the table is cast to the backbone dtype here so
    the encoder itself stays fp32."""
    embeds_BSH = F.embedding(ids_BS, word_embeddings_VH.detach())
    return insert_prompt_rows(embeds_BSH, prompt_rows_N, prompt_pos_N, prompt_slots_N, table_MH)


def insert_prompt_rows(embeds_BSH, prompt_rows_N, prompt_pos_N, prompt_slots_N, table_MH) -> Tensor:
    """The oracle's second half, for backbones whose lookup is not one table (a vocabulary-parallel
    table looks up its shard and all-reduces over tensor parallelism first)."""
    rows_NH = table_MH.to(embeds_BSH.dtype)[prompt_slots_N]
    return embeds_BSH.index_put((prompt_rows_N, prompt_pos_N), rows_NH)


def slot_map(prompt_rows_N: Tensor, prompt_pos_N: Tensor, prompt_slots_N: Tensor, B: int, S: int,
             dtype: torch.dtype = torch.int32) -> Tensor:
    """The prompt plan as a [B, S] slot map: -1 everywhere, the slot at each prompt position."""
    slot_BS = torch.full((B, S), -1, dtype=dtype, device=prompt_rows_N.device)
    return slot_BS.index_put_((prompt_rows_N, prompt_pos_N), prompt_slots_N.to(dtype))


def splice(ids_BS: Tensor, slot_BS: Tensor, weight_VH: Tensor, table_MH: Tensor, vocab_start: int = 0,
           write_prompt: bool = True, seq_first: bool = False, pos_weight_TH: Tensor | None = None,
           seq_start: int = 0, seq_len: int | None = None, backend: str = "fused",
           vocab_size: int | None = None, position_BS: Tensor | None = None) -> Tensor:
    """embeds_BLH (or _LBH with ``seq_first``) in the weight's dtype, L = ``seq_len`` (default: to the
    end of the sequence); see the module docstring. Shapes are checked here, on the host.
    ``vocab_size``: the whole vocabulary (default: this table's rows from ``vocab_start``); an id
    outside it is an error (a shard writes zeros for ids of the other shards, so without this
    check an id past the vocabulary would silently be a zero vector). On CUDA the check is
    ``torch._assert_async``: a device-side assert, no host sync; on CPU a scan of the B x S ids.
    ``position_BS``: per-token rows of ``pos_weight_TH`` (checked in range the same way)."""
    if backend not in BACKENDS:
        raise ValueError(f"splice backend {backend!r}: expected one of {BACKENDS}")
    S = ids_BS.shape[1]
    seq_len = S - seq_start if seq_len is None else seq_len
    if not (0 <= seq_start and 0 <= seq_len and seq_start + seq_len <= S):
        raise ValueError(f"splice: sequence chunk [{seq_start}, {seq_start + seq_len}) is outside [0, {S})")
    if slot_BS.shape != ids_BS.shape:
        raise ValueError(f"splice: slot map {tuple(slot_BS.shape)} != ids {tuple(ids_BS.shape)}")
    if pos_weight_TH is not None:
        short = position_BS is None and pos_weight_TH.shape[0] < seq_start + seq_len  # per-token: checked below
        if short or pos_weight_TH.shape[1:] != weight_VH.shape[1:] \
                or pos_weight_TH.dtype != weight_VH.dtype:
            raise ValueError(f"splice: position table {tuple(pos_weight_TH.shape)} {pos_weight_TH.dtype} cannot serve "
                             f"positions up to {seq_start + seq_len} of a {tuple(weight_VH.shape)} {weight_VH.dtype} table")
        pos_weight_TH = pos_weight_TH.detach()
    if position_BS is not None:
        if pos_weight_TH is None:
            position_BS = None  # RoPE, or a TP rank that adds no positions: the ids carry no position
        elif position_BS.shape != ids_BS.shape:
            raise ValueError(f"splice: positions {tuple(position_BS.shape)} != ids {tuple(ids_BS.shape)}")
        else:
            T = pos_weight_TH.shape[0]
            torch._assert_async(((position_BS >= 0) & (position_BS < T)).all(),
                                f"splice: a position id is outside the position table [0, {T})")
    V = int(vocab_start) + weight_VH.shape[0] if vocab_size is None else int(vocab_size)
    torch._assert_async(((ids_BS >= 0) & (ids_BS < V)).all(), f"splice: a token id is outside the vocabulary [0, {V})")
    if (seq_start, seq_len) != (0, S):  # a small int copy of the chunk's ids and slots (B x L)
        ids_BS, slot_BS = ids_BS[:, seq_start:seq_start + seq_len], slot_BS[:, seq_start:seq_start + seq_len]
        if position_BS is not None:
            position_BS = position_BS[:, seq_start:seq_start + seq_len]
    return torch.ops.ptuning.splice(ids_BS, slot_BS, weight_VH.detach(), int(vocab_start), table_MH,
                                    bool(write_prompt), bool(seq_first), pos_weight_TH, int(seq_start), backend,
                                    position_BS)


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None  # the CPU install has it only with the test extra


def _triton():
    from ptuning_dist.ops import splice_triton

    return splice_triton


def _pick(device: torch.device, backend: str) -> str:
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if not _has_triton():
            raise RuntimeError("splice backend 'triton': triton is not installed")
        return "triton"
    if device.type == "cuda":
        if _has_triton():
            return "triton"
        _warn_once("cuda", "ptuning::splice: triton is not installed; using the reference splice on CUDA")
        return "reference"
    if device.type == "cpu":
        return "cpu" if _load_cpu() else "reference"
    return "reference"


def _load_cpu():
    global _cpu_ext
    if _cpu_ext is None:
        try:
            from ptuning_dist import debug
            from ptuning_dist.compat.build_lock import load  # torch's loader, minus the stale-lock hang

            src = Path(__file__).with_name("splice_cpu.cpp")
            _cpu_ext = load("ptuning_splice_cpu", [str(src)], extra_cflags=["-O3", "-fopenmp"],
                            extra_ldflags=["-fopenmp"], verbose=False)
            _cpu_ext.set_output_cache(debug.splice_output_cache())
        except Exception as e:  # no compiler / headers: keep training, slower
            _warn_once("cpu", f"ptuning::splice: the CPU kernel did not build ({type(e).__name__}: {e}); "
                              "using the reference splice")
            _cpu_ext = False
    return _cpu_ext


# ---- the op's reference backend (pure torch, no data-dependent shapes) ----

def _reference_fwd(ids_BS, slot_BS, weight_VH, vocab_start, table_MH, write_prompt, seq_first, pos_TH, pos_offset,
                   position_BS=None):
    V, M = weight_VH.shape[0], table_MH.shape[0]
    v_BS = ids_BS - vocab_start
    local_BS1 = ((v_BS >= 0) & (v_BS < V)).unsqueeze(-1)
    zero = weight_VH.new_zeros(())
    out_BSH = torch.where(local_BS1, F.embedding(v_BS.clamp(0, max(V - 1, 0)), weight_VH), zero)
    if write_prompt and M > 0:
        rows_BSH = table_MH.to(weight_VH.dtype)[slot_BS.long().clamp(min=0)]
        out_BSH = torch.where(slot_BS.unsqueeze(-1) >= 0, rows_BSH, out_BSH)
    else:
        out_BSH = torch.where(slot_BS.unsqueeze(-1) >= 0, zero, out_BSH)
    if pos_TH is not None and position_BS is not None:
        out_BSH = out_BSH + F.embedding(position_BS, pos_TH)
    elif pos_TH is not None:
        out_BSH = out_BSH + pos_TH[pos_offset:pos_offset + ids_BS.shape[1]].unsqueeze(0)
    return out_BSH.transpose(0, 1).contiguous() if seq_first else out_BSH


def _reference_bwd(grad, slot_BS, num_slots, seq_first):
    H = grad.shape[-1]
    grad_PH = (grad.transpose(0, 1) if seq_first else grad).reshape(-1, H).float()  # b * S + s order
    slot_P = slot_BS.reshape(-1).long()
    if grad.device.type == "cpu":  # index_add_ on CPU sums serially in position order
        idx_P = torch.where(slot_P >= 0, slot_P, num_slots)
        acc = torch.zeros((num_slots + 1, H), dtype=torch.float32, device=grad.device)
        return acc.index_add_(0, idx_P, grad_PH)[:num_slots].clone()
    # elsewhere index_add_ uses atomics: a one-hot product is deterministic (M x P x H flops, small M)
    onehot_PM = (slot_P.unsqueeze(1) == torch.arange(num_slots, device=grad.device)).float()
    return onehot_PM.t() @ grad_PH


# ---- the op ----

@torch.library.custom_op("ptuning::splice", mutates_args=())
def _splice_op(ids_BS: Tensor, slot_BS: Tensor, weight_VH: Tensor, vocab_start: int, table_MH: Tensor,
               write_prompt: bool, seq_first: bool, pos_weight_TH: Tensor | None, pos_offset: int,
               backend: str, position_BS: Tensor | None = None) -> Tensor:
    args = (ids_BS.contiguous(), slot_BS.contiguous(), weight_VH.contiguous(), vocab_start)
    pos = None if pos_weight_TH is None else pos_weight_TH.contiguous()
    tok_pos = None if position_BS is None or pos is None else position_BS.contiguous().long()
    kind = _pick(ids_BS.device, backend)
    if kind == "reference":
        return _reference_fwd(*args, table_MH, write_prompt, seq_first, pos, pos_offset, tok_pos)
    table_MH = table_MH.float().contiguous()
    if kind == "cpu":  # no position table / per-token positions: empty ones
        return _cpu_ext.splice_fwd(*args, table_MH, write_prompt, seq_first,
                                   weight_VH.new_empty((0,)) if pos is None else pos, pos_offset,
                                   ids_BS.new_empty((0,)) if tok_pos is None else tok_pos)
    return _triton().forward(*args, table_MH, write_prompt, seq_first, pos, pos_offset, tok_pos)


@_splice_op.register_fake
def _(ids_BS, slot_BS, weight_VH, vocab_start, table_MH, write_prompt, seq_first, pos_weight_TH, pos_offset, backend,
      position_BS=None):
    (B, S), H = ids_BS.shape, weight_VH.shape[1]
    return weight_VH.new_empty((S, B, H) if seq_first else (B, S, H))


@torch.library.custom_op("ptuning::splice_table_grad", mutates_args=())
def _splice_table_grad(grad_out: Tensor, slot_BS: Tensor, num_slots: int, seq_first: bool, backend: str) -> Tensor:
    grad_out, slot_BS = grad_out.contiguous(), slot_BS.contiguous()
    kind = _pick(grad_out.device, backend)
    if kind == "reference":
        return _reference_bwd(grad_out, slot_BS, num_slots, seq_first)
    if kind == "cpu":
        return _cpu_ext.splice_bwd(grad_out, slot_BS, num_slots, seq_first)
    return _triton().table_grad(grad_out, slot_BS, num_slots, seq_first)


@_splice_table_grad.register_fake
def _(grad_out, slot_BS, num_slots, seq_first, backend):
    return grad_out.new_empty((num_slots, grad_out.shape[-1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, slot_BS, _, _, table_MH, _, seq_first, _, _, backend, _ = inputs
    ctx.save_for_backward(slot_BS)
    ctx.num_slots, ctx.table_dtype, ctx.seq_first, ctx.backend = table_MH.shape[0], table_MH.dtype, seq_first, backend


def _backward(ctx, grad_out):
    grad_table = None
    if ctx.needs_input_grad[4]:
        (slot_BS,) = ctx.saved_tensors
        grad_table = torch.ops.ptuning.splice_table_grad(grad_out, slot_BS, ctx.num_slots, ctx.seq_first,
                                                         ctx.backend).to(ctx.table_dtype)
    return None, None, None, None, grad_table, None, None, None, None, None, None


_splice_op.register_autograd(_backward, setup_context=_setup_context)
