"""Shard-wise reads of a Hugging Face model's safetensors: only the files, tensors and slices a rank
needs, converted straight to the run's dtype, with every byte read counted.

Why a reader of our own instead of ``safetensors.safe_open``: a memory map counts every touched page
in the rank's RSS until the file is closed, and a column slice (``sl[:, a:b]``, what a row-parallel
weight's TP split is in Hugging Face's layout) touches every page of the tensor (cpu-facts,
"Shard-wise loading"). Here a row range is one ``readinto`` of its bytes, a column range one read
per row of just its columns: what comes into memory is the slice, what is counted
(``bytes_read``) is what was read. The format is an 8-byte little-endian header length, a JSON
header (name -> dtype, shape, data offsets) and the raw row-major data: parsing it executes nothing.

Bad files fail before any training step with one ``CheckpointError`` naming the file and tensor:
an index naming a missing file, a header that is not safetensors, a file shorter than its header
says (truncated), a tensor the config needs but no file holds, or one of another shape.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ptuning_dist.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def has_safetensors(model_dir: str | Path) -> bool:
    model_dir = Path(model_dir)
    return (model_dir / INDEX).is_file() or (model_dir / SINGLE).is_file()


def check_complete(path: Path) -> None:
    """A CheckpointError naming ``path`` unless it is a whole safetensors file (header parsed, every
    tensor's bytes inside the file): a truncated download fails here, not in the middle of a load."""
    _File(Path(path)).f.close()


class _File:
    """One safetensors file: its header parsed, its data read by offset (no memory map)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.f = path.open("rb")
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        size = os.fstat(self.f.fileno()).st_size
        head = self.f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(self.f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
        header.pop("__metadata__", None)
        self.start, self.tensors = 8 + n, {}
        for name, info in header.items():
            try:
                dtype, shape, (a, b) = DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if b - a != numel * dtype.itemsize or a < 0:
                raise CheckpointError(f"{path}: tensor {name!r}: {b - a} bytes for shape {list(shape)} "
                                      f"{info['dtype']}")
            if self.start + b > size:
                raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {self.start + b}, "
                                      f"the file has {size}")
            self.tensors[name] = (dtype, shape, a)

    def read_into(self, buf: torch.Tensor, offset: int) -> None:
        """Fill the uint8 tensor ``buf`` from byte ``offset`` of the data section."""
        self.f.seek(self.start + offset)
        view = memoryview(buf.numpy())
        if self.f.readinto(view) != buf.numel():
            raise CheckpointError(f"{self.path}: truncated while reading at byte {self.start + offset}")

    def close(self) -> None:
        self.f.close()


class WeightFiles:
    """The safetensors of a model directory (``model.safetensors.index.json`` or one
    ``model.safetensors``), opened file by file as tensors are asked for.

    ``read(name, shape, rows=, cols=)`` returns the [rows, cols] slice of tensor ``name`` (2-D; a 1-D
    tensor takes ``rows``) in ``dtype``; ``shape`` is the shape the config implies, checked against
    the file. ``bytes_read`` and ``files_opened`` say what it cost."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype):
        self.dir, self.dtype = Path(model_dir), dtype
        self.bytes_read = 0
        self._files: dict[str, _File] = {}
        self._opened: set[str] = set()
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a safetensors index (no \"weight_map\" object)") from None
            for name, file in weight_map.items():
                if not isinstance(file, str) or "/" in file or file.startswith(".") or not file.endswith(".safetensors"):
                    raise CheckpointError(f"{index}: tensor {name!r} maps to {file!r}, not a .safetensors file "
                                          "beside the index")
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise CheckpointError(f"{index}: names {missing[0]}, which is not in {self.dir}"
                                      + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
            self.weight_map, self.source = dict(weight_map), index
        elif (self.dir / SINGLE).is_file():
            self.weight_map, self.source = None, self.dir / SINGLE
        else:
            raise CheckpointError(f"model.path: {self.dir} has no {INDEX} or {SINGLE} (the megatron backend and "
                                  "shard-wise loading read safetensors only; re-save with save_pretrained)")

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    @property
    def files_opened(self) -> list[str]:
        """Every file opened so far (closed ones included)."""
        return sorted(self._opened)

    def names(self) -> list[str]:
        """Every tensor name (from the index; a single file's header)."""
        if self.weight_map is not None:
            return list(self.weight_map)
        return list(self._file(SINGLE).tensors)

    def _file(self, file: str) -> _File:
        if file not in self._files:
            self._files[file] = _File(self.dir / file)
            self._opened.add(file)
        return self._files[file]

    def entry(self, name: str) -> tuple[_File, torch.dtype, tuple, int]:
        file = self.weight_map.get(name) if self.weight_map is not None else SINGLE
        if file is None:
            raise CheckpointError(f"{self.source}: no tensor {name!r} (the model's config.json needs it)")
        f = self._file(file)
        if name not in f.tensors:
            where = f"{self.source} maps it to {file}, which" if self.weight_map is not None else f"{f.path}"
            raise CheckpointError(f"{where} has no tensor {name!r} (the model's config.json needs it)")
        return (f, *f.tensors[name])

    def shape(self, name: str) -> tuple:
        return self.entry(name)[2]

    def read_flat(self, name: str, shape: tuple, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of tensor ``name`` flattened (row-major): one contiguous read."""
        f, dtype, have, offset = self._checked(name, shape)
        assert 0 <= start <= stop, (name, start, stop)
        buf = torch.empty((stop - start) * dtype.itemsize, dtype=torch.uint8)
        f.read_into(buf, offset + start * dtype.itemsize)
        self.bytes_read += buf.numel()
        return buf.view(dtype).to(self.dtype)

    def _checked(self, name: str, shape: tuple):
        f, dtype, have, offset = self.entry(name)
        if tuple(have) != tuple(shape):
            raise CheckpointError(f"{f.path}: tensor {name!r} has shape {list(have)}, the model's config.json "
                                  f"implies {list(shape)}")
        return f, dtype, have, offset

    def read(self, name: str, shape: tuple, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        f, dtype, have, offset = self._checked(name, shape)
        r0, r1 = rows if rows is not None else (0, have[0])
        assert 0 <= r0 <= r1 <= have[0], (name, rows, have)
        row_bytes = dtype.itemsize
        for s in have[1:]:
            row_bytes *= s
        if cols is None:
            buf = torch.empty((r1 - r0) * row_bytes, dtype=torch.uint8)
            f.read_into(buf, offset + r0 * row_bytes)
            out = buf.view(dtype).reshape(r1 - r0, *have[1:])
        else:
            assert len(have) == 2 and 0 <= cols[0] <= cols[1] <= have[1], (name, cols, have)
            c0, c1 = cols
            width = (c1 - c0) * dtype.itemsize
            buf = torch.empty(r1 - r0, width, dtype=torch.uint8)
            for i in range(r1 - r0):  # one read per row: only this slice's bytes come in
                f.read_into(buf[i], offset + (r0 + i) * row_bytes + c0 * dtype.itemsize)
            out = buf.view(dtype).reshape(r1 - r0, c1 - c0)
        self.bytes_read += buf.numel()
        return out.to(self.dtype)
