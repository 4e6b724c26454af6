"""One safetensors file, read and written: the header parsed and validated (``read_header``), one tensor read
(``read_tensor``), a file written whole (from tensors in memory and byte ranges of other files) or streamed
(``StreamedShard``: tensor by tensor as they arrive, the header last).

Hand-rolled around the safetensors *format* (an 8-byte little-endian header length, a JSON header with every
tensor's dtype, shape and byte range, then the data) so that converters control exactly when bytes are
read and written and never hold a whole model; ``checkpoint`` decides what goes into which file of a folder.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .direct_io import ALIGN, Cancelled, DirectFile, StagingBuffer

if TYPE_CHECKING:
    import torch

# safetensors dtype names -> item sizes (header validation needs no torch) and torch dtype attribute names
# (the subset torch supports on every platform we run).
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPE_ATTRS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _TORCH_DTYPE_ATTRS[name])


def _dtype_name(dtype: torch.dtype) -> str | None:
    import torch

    return next((n for n, attr in _TORCH_DTYPE_ATTRS.items() if getattr(torch, attr) == dtype), None)


_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live inside a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ``({name: TensorInfo}, metadata)``.

    Raises ``UserError`` naming the file when it is not safetensors, its header is damaged, or it is truncated
    (a tensor's bytes would lie past the end of the file).
    """
    def bad(reason: str) -> UserError:
        return UserError(f"{path}: corrupt or truncated safetensors file ({reason})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise bad("shorter than a header")
            length = int.from_bytes(prefix, "little")
            if length <= 0 or length > _MAX_HEADER or 8 + length > size:
                raise bad("invalid header length")
            raw = handle.read(length)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    base = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"bad entry for {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise bad(f"unsupported dtype {dtype!r} of {name!r}")
        numel = 1
        for dim in shape:
            numel *= dim
        itemsize = DTYPE_SIZES[dtype]
        if not (0 <= begin <= end) or end - begin != numel * itemsize:
            raise bad(f"bad data offsets of {name!r}")
        if base + end > size:
            raise bad(f"tensor {name!r} ends past the end of the file")
        tensors[name] = TensorInfo(dtype, shape, base + begin, base + end)
    return tensors, metadata


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """One tensor's bytes read with ``pread`` into a fresh tensor (no mmap: memory is exactly the tensor)."""
    import torch

    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        with open(path, "rb", buffering=0) as handle:
            view = memoryview(buffer.numpy())
            done = 0
            while done < info.nbytes:
                count = os.preadv(handle.fileno(), [view[done:]], info.start + done)
                if count <= 0:
                    raise UserError(f"{path}: truncated while reading (file changed during conversion?)")
                done += count
    return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)



def _contiguous_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as a flat contiguous CPU tensor (a view when it already is one)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1)


def _put_tensor(direct: DirectFile, tensor: torch.Tensor) -> None:
    """Append ``tensor``'s bytes to ``direct`` (the flat view stays alive for the call)."""
    flat = _contiguous_bytes(tensor)
    direct.put(flat.data_ptr(), flat.numel() * flat.element_size())


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    import torch

    flat = _contiguous_bytes(tensor)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


_COPY_CHUNK = 64 * 1024 * 1024  # bytes per kernel copy call: cancellation is checked between calls


def _copy_range(src: Any, dst: Any, offset: int, count: int, cancel: threading.Event | None = None) -> None:
    """Copy ``count`` bytes at ``offset`` of file ``src`` to the current position of ``dst`` (kernel-side)."""
    src_fd, dst_fd = src.fileno(), dst.fileno()
    try:
        while count > 0:
            if cancel is not None and cancel.is_set():
                raise Cancelled
            done = os.copy_file_range(src_fd, dst_fd, min(count, _COPY_CHUNK), offset)
            if done <= 0:
                raise OSError("copy_file_range made no progress")
            offset += done
            count -= done
        return
    except (AttributeError, OSError):
        pass  # not supported across these filesystems: fall back to a bounded buffer
    src.seek(offset)
    while count > 0:
        if cancel is not None and cancel.is_set():
            raise Cancelled
        chunk = src.read(min(count, 16 * 1024 * 1024))
        if not chunk:
            raise UserError(f"{src.name}: truncated while copying")
        dst.write(chunk)
        count -= len(chunk)


@dataclass(frozen=True)
class Entry:
    """A tensor to write: either in memory (``tensor``) or a byte range of a source file (``source``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    tensor: torch.Tensor | None = None
    source: tuple[Path, TensorInfo] | None = None
    on_written: Callable[[torch.Tensor], None] | None = None  # gets ``tensor`` back once its bytes are written


def _header_member(entry: Entry, offset: int) -> dict[str, Any]:
    """``entry``'s value in a safetensors header when its bytes start ``offset`` bytes into the data section."""
    return {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}


def header_bytes(entries: list[Entry], metadata: dict[str, str], *, size: int | None = None) -> tuple[bytes, int]:
    """The safetensors header for ``entries`` laid out in order, and the data section's size. The JSON is
    padded with spaces (the format allows it) to a multiple of 8 bytes, as the reference writer does, or so
    that the whole header is exactly ``size`` bytes (a ``StreamedShard`` reserved that much before the data)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.name] = _header_member(entry, offset)
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if size is None:
        raw += b" " * (-len(raw) % 8)
    elif len(raw) + 8 > size:
        raise ValueError(f"a header of {len(raw) + 8} bytes does not fit the {size} reserved")
    else:
        raw += b" " * (size - 8 - len(raw))
    return len(raw).to_bytes(8, "little") + raw, offset


def header_entry_bytes(entry: Entry) -> int:
    """Bytes ``entry`` adds to a shard's JSON header (its ``"name":{...}`` member and a comma), for offsets up to
    the shard size: lets a streamed shard know when its reserved header space is full."""
    member = {entry.name: _header_member(entry, 10**12)}  # offsets written no longer than this one
    return len(json.dumps(member, separators=(",", ":")).encode("utf-8")) - 2 + 1


def header_reserve(max_shard_bytes: int) -> int:
    """Header room a streamed shard reserves: 1/4096 of its data, within [4 KB, 64 KB] and ``ALIGN``-rounded
    (64 KB holds ~500 expert tensors' entries; the unused part is spaces, 0.02% of a 256 MB shard)."""
    return min(64 * 1024, max(ALIGN, max_shard_bytes // 4096 // ALIGN * ALIGN))


class StreamedShard:
    """A safetensors file written while its tensors arrive: ``append`` writes each tensor's bytes right after
    the ``reserve`` bytes left for the header, ``finish(entries, metadata)`` writes the header (padded to fill
    the reserve) and makes the file final. A writer then holds one tensor at a time, not a whole shard of them
    (upcycle: ~0.5 GB less memory, and the freed noise buffers are reused sooner).

    ``O_DIRECT`` through ``staging`` when given and allowed (``direct_io``), else an ordinary file. All calls
    come from one thread (the shard writer's)."""

    def __init__(self, path: Path, reserve: int, staging: StagingBuffer | None,
                 cancel: threading.Event | None = None) -> None:
        if reserve % ALIGN:
            raise ValueError(f"the header reserve must be a multiple of {ALIGN}, got {reserve}")
        self.path, self.reserve, self.cancel = path, reserve, cancel
        self._direct = DirectFile.open(path, staging, cancel, start=reserve) if staging is not None else None
        self._file = None
        if self._direct is None:
            self._file = open(path, "wb")
            self._file.seek(reserve)

    def append(self, tensor: torch.Tensor) -> None:
        if self._direct is not None:
            _put_tensor(self._direct, tensor)
        else:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled
            self._file.write(_tensor_bytes(tensor))  # type: ignore[union-attr]

    def finish(self, entries: list[Entry], metadata: dict[str, str]) -> int:
        """Write the header of ``entries`` (the appended tensors, in order); returns the data size."""
        header, size = header_bytes(entries, metadata, size=self.reserve)
        try:
            if self._direct is not None:
                self._direct.finish(header)
            else:
                self._file.seek(0)  # type: ignore[union-attr]
                self._file.write(header)  # type: ignore[union-attr]
        finally:
            self.close()
        return size

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _source_runs(entries: list[Entry]) -> Iterator[tuple[Entry, int]]:
    """Group consecutive entries whose source bytes are adjacent in the same file: ``(first entry, run bytes)``.

    A rewritten shard keeps almost all of its tensors in order, so its data is copied in a handful of kernel
    calls instead of one per tensor."""
    run: Entry | None = None
    length = 0
    for entry in entries:
        if run is not None and entry.source is not None and run.source is not None and run.source[0] == entry.source[0] \
                and run.source[1].start + length == entry.source[1].start:
            length += entry.nbytes
            continue
        if run is not None:
            yield run, length
        run, length = entry, entry.nbytes
    if run is not None:
        yield run, length


def write_safetensors(dst: Path, entries: list[Entry], metadata: dict[str, str],
                       cancel: threading.Event | None = None, staging: StagingBuffer | None = None) -> int:
    """Write a safetensors file from ``entries`` in order; returns the data size. Source ranges are streamed
    kernel-side; a shard held wholly in memory goes through ``staging`` with ``O_DIRECT`` when one is given and
    the filesystem allows it (``direct_io``), else through the page cache."""
    header, size = header_bytes(entries, metadata)
    if staging is not None and all(entry.tensor is not None for entry in entries):
        direct = DirectFile.open(dst, staging, cancel)
        if direct is not None:
            try:
                direct.put_bytes(header)
                for entry in entries:
                    _put_tensor(direct, entry.tensor)  # type: ignore[arg-type]
                direct.finish()
            finally:
                direct.close()
            return size
    handles: dict[Path, Any] = {}
    try:
        with open(dst, "wb") as out:
            out.write(header)
            for entry, length in _source_runs(entries):
                if entry.tensor is not None:
                    out.write(_tensor_bytes(entry.tensor))
                else:
                    src_path, info = entry.source  # type: ignore[misc]
                    if src_path not in handles:
                        handles[src_path] = open(src_path, "rb")
                    out.flush()
                    _copy_range(handles[src_path], out, info.start, length, cancel)
                    out.seek(0, os.SEEK_END)
    finally:
        for handle in handles.values():
            handle.close()
    return size


def memory_entry(name: str, tensor: torch.Tensor, on_written: Callable[[torch.Tensor], None] | None = None) -> Entry:
    dtype = _dtype_name(tensor.dtype)
    if dtype is None:
        raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
    return Entry(name, dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size(), tensor=tensor,
                  on_written=on_written)


def copy_file(src: Path, dst: Path, cancel: threading.Event | None = None) -> None:
    """Copy a whole file kernel-side (``copy_file_range``), checking ``cancel`` between chunks."""
    with open(src, "rb") as source, open(dst, "wb") as target:
        _copy_range(source, target, 0, os.fstat(source.fileno()).st_size, cancel)
