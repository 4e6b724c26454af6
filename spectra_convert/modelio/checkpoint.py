"""A model folder's safetensors checkpoint: ``CheckpointReader`` reads it, ``ShardWriter`` writes one.

Why it is hand-rolled around the safetensors *format* (``safetensors_files``) rather than ``save_pretrained``:
converters must never hold a whole model (mergekit #54/#157: conversions killed by RAM, half-written output). So

* ``CheckpointReader`` validates every shard's header up front (a corrupt or truncated file fails in one line
  naming it, before any expensive work) and reads one tensor at a time with ``pread`` — no mmap, so the bytes
  it touches do not linger in the process's resident set.
* ``ShardWriter`` writes shards as they fill (memory ~ one shard), hard-links untouched shards, and rewrites a
  shard that needs a few tensors changed *by streaming the other tensors' bytes* from the source file
  (``copy_file_range``): expert tensors keep their names and exact bytes and never enter Python memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .direct_io import Cancelled, StagingBuffer
from .safetensors_files import (Entry, StreamedShard, TensorInfo, copy_file, header_bytes, header_entry_bytes,
                                header_reserve, memory_entry, read_header, read_tensor, write_safetensors)

if TYPE_CHECKING:  # torch is imported lazily: reroute starts copying shards before torch/transformers load
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Reading a model folder's checkpoint
# ---------------------------------------------------------------------------------------------------------------


class CheckpointReader:
    """All tensors of a model folder (``model.safetensors.index.json`` + shards, or one ``model.safetensors``).

    Every shard header is validated on construction; tensors are read one at a time on demand.
    """

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_NAME
        single = self.model_dir / SINGLE_NAME
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                weight_map = data["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
            self.metadata: dict[str, Any] = data.get("metadata") or {}
            self._shard_of = {name: self.model_dir / file for name, file in weight_map.items()}
        elif single.is_file():
            self.metadata = {}
            self._shard_of = None  # filled from the header below
        else:
            found = sorted(p.name for p in self.model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
            hint = f" (found {found[0]}; only safetensors checkpoints are supported)" if found else ""
            raise UserError(f"{self.model_dir}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        shard_paths = sorted({single} if self._shard_of is None else set(self._shard_of.values()))
        self.headers: dict[Path, dict[str, TensorInfo]] = {}
        self.shard_metadata: dict[Path, dict[str, str]] = {}
        for path in shard_paths:
            if not path.is_file():
                raise UserError(f"{index}: names the shard {path.name}, which is missing")
            self.headers[path], self.shard_metadata[path] = read_header(path)
        if self._shard_of is None:
            self._shard_of = {name: single for name in self.headers[single]}
        for name, path in self._shard_of.items():
            if name not in self.headers[path]:
                raise UserError(f"{index}: says {name!r} is in {path.name}, but that shard has no such tensor")

    @property
    def shards(self) -> list[Path]:
        return list(self.headers)

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def shard_of(self, name: str) -> Path:
        return self._shard_of[name]

    def info(self, name: str) -> TensorInfo:
        return self.headers[self._shard_of[name]][name]

    def keys_in(self, shard: Path) -> list[str]:
        """The indexed tensors stored in ``shard``, in file order."""
        return [name for name in self.headers[shard] if self._shard_of.get(name) == shard]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._shard_of:
            raise KeyError(name)
        return read_tensor(self._shard_of[name], self.info(name))


# ---------------------------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------------------------


def _hardlink(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst)
        return True
    except OSError:  # another filesystem (or links not allowed)
        return False


class _BackgroundWrites:
    """One writer thread that runs queued file writes in submission order, so shard I/O overlaps the caller's
    compute (``copy_file_range`` and tensor writes release the GIL).

    The first failure sets ``cancel``: later jobs are skipped and running copies stop between 64 MB chunks,
    so a failed conversion removes its temp folder promptly; ``wait`` re-raises that first failure.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectra-shard-writer")
        self._cancel = threading.Event()
        self._futures: list[Future] = []

    def submit(self, job: Callable[[threading.Event], None]) -> Future:
        future = self._pool.submit(self._guarded, job)
        self._futures.append(future)
        return future

    def _guarded(self, job: Callable[[threading.Event], None]) -> None:
        if self._cancel.is_set():
            return
        try:
            job(self._cancel)
        except BaseException:
            self._cancel.set()
            raise

    def wait(self, on_progress: Callable[[int, int], None] | None = None, counted: list[Future] | None = None) -> None:
        """Run everything queued, stop the thread, re-raise the first error. ``on_progress(done, total)`` is
        called as the ``counted`` jobs (default: all) finish, for a progress bar."""
        counted = self._futures if counted is None else counted
        total = len(counted)
        for done, future in enumerate(counted):  # the single worker finishes them in this order
            if on_progress is not None:
                on_progress(done, total)
            futures_wait([future])
        if on_progress is not None:
            on_progress(total, total)
        futures_wait(self._futures)
        self._pool.shutdown()
        errors = [f.exception() for f in self._futures if f.exception() is not None]
        real = [e for e in errors if not isinstance(e, Cancelled)]
        if real:
            raise real[0]

    def cancel(self) -> None:
        self._cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


_SHARD_METADATA = {"format": "pt"}  # what transformers' own writer puts in every shard's header


@dataclass
class _OpenStream:
    """A streamed shard being filled: its temp path, and its file once the writer thread has opened it."""

    path: Path
    shard: StreamedShard | None = None


class ShardWriter:
    """Writes safetensors shards + ``model.safetensors.index.json`` into ``out_dir``.

    Three ways to add tensors, which can be mixed:
    ``add`` (in memory; a shard is flushed when ``max_shard_bytes`` is reached, so memory stays ~ one shard),
    ``link_shard`` (a whole existing shard, hard-linked or copied), ``rewrite_shard`` (an existing shard with
    some tensors dropped and others added; kept tensors are byte-copied from the source, never loaded).
    The final shard count is only known at ``close``, so shards are written under temp names and renamed then.

    ``background=True`` queues every file write on one writer thread (in submission order) and returns at
    once; ``close`` waits for them. Use it as a context manager so an exception cancels the queued writes
    before the caller removes the folder. Memory: at most ``max_queued_shards`` flushed in-memory shards wait
    for the thread (``add`` then blocks until the thread catches up).
    ``direct_io`` (default): shards built wholly from memory are written with ``O_DIRECT`` through one reused
    staging buffer and fsynced (``direct_io`` module: no page-cache copy); shards streamed from source files,
    and filesystems that refuse ``O_DIRECT``, go through the page cache.
    ``streamed``: ``add`` writes each tensor into the open shard file at once (``StreamedShard``: the header is
    reserved up front and written when the shard is full), so memory is the few tensors in flight, not a
    shard; ``max_queued_shards`` then bounds queued tensors. The header keeps space padding (<= 64 KB a shard).
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 1024**3, *, background: bool = False,
                 max_queued_shards: int = 1, direct_io: bool = True, streamed: bool = False):
        self.out_dir = Path(out_dir)
        self.direct_io, self.streamed = direct_io, streamed
        self._stream: _OpenStream | None = None  # the streamed shard being filled
        self._header_room = header_reserve(max_shard_bytes)
        self._header_used = 0
        self._staging: StagingBuffer | None = None  # made on first use, by the one thread that writes
        self.max_shard_bytes = int(max_shard_bytes)
        self._pending: list[Entry] = []
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str], int]] = []  # (temp path, names, data bytes)
        self._names: set[str] = set()
        self.linked = 0  # shards hard-linked (not copied)
        self.closed = False
        self._writes = _BackgroundWrites() if background else None
        self._queued_shards = threading.Semaphore(max(1, int(max_queued_shards)))
        self._shard_jobs: list[Future] = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._writes is not None:
            self._writes.cancel()

    def _claim(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self._names:
                raise ValueError(f"tensor {name!r} written twice")
            self._names.add(name)

    def _temp_path(self) -> Path:
        return self.out_dir / f".shard-{len(self._shards):05d}.safetensors.tmp"

    def _run(self, job: Callable[[threading.Event | None], None], *, holds_tensors: bool = False,
             completes_shard: bool = False) -> None:
        """Run a file write now, or queue it on the writer thread. A job holding in-memory tensors waits for a
        free slot first (``max_queued_shards``), which bounds the memory of queued shards. Jobs that complete a
        shard are what ``close`` reports progress on."""
        if self._writes is None:
            job(None)
            return
        if holds_tensors:
            self._queued_shards.acquire()
        future = self._writes.submit(job)
        if holds_tensors:  # released when the job ends, fails, is skipped after a failure or is cancelled
            future.add_done_callback(lambda _: self._queued_shards.release())
        if completes_shard:
            self._shard_jobs.append(future)

    def _staging_buffer(self) -> StagingBuffer | None:
        if self.direct_io and self._staging is None:
            self._staging = StagingBuffer()
        return self._staging

    def _write(self, path: Path, entries: list[Entry], metadata: dict[str, str]) -> int:
        """Write (or queue) one shard; returns its data size (known from the entries before writing)."""

        def write(cancel: threading.Event | None) -> None:
            try:
                write_safetensors(path, entries, metadata, cancel, self._staging_buffer())
                for entry in entries:
                    if entry.on_written is not None:
                        entry.on_written(entry.tensor)  # type: ignore[arg-type]
            finally:
                entries.clear()  # drop the tensors as soon as they are on disk

        size = sum(e.nbytes for e in entries)
        self._run(write, holds_tensors=any(e.tensor is not None for e in entries), completes_shard=True)
        return size

    def add(self, name: str, tensor: torch.Tensor, *, on_written: Callable[[torch.Tensor], None] | None = None) -> None:
        """Queue ``tensor`` for the current shard. ``on_written(tensor)`` is called (on the writer thread) once
        its bytes are in the file, so its buffer can be reused; the caller must not change it before then."""
        entry = memory_entry(name, tensor.detach().to("cpu").contiguous(), on_written)
        self._claim([name])
        if self.streamed:
            self._add_streamed(entry)
            return
        if self._pending and self._pending_bytes + entry.nbytes > self.max_shard_bytes:
            self.flush()
        self._pending.append(entry)
        self._pending_bytes += entry.nbytes

    def _add_streamed(self, entry: Entry) -> None:
        """``streamed`` mode: the tensor goes to the open shard file now (the writer thread appends it), only its
        header entry is kept until ``flush``."""
        header_entry = dataclasses.replace(entry, tensor=None, on_written=None)
        grows = header_entry_bytes(header_entry)
        if self._pending and (self._pending_bytes + entry.nbytes > self.max_shard_bytes
                              or self._header_used + grows > self._header_room):
            self.flush()
        if self._stream is None:
            stream = self._stream = _OpenStream(self._temp_path())
            room = self._header_room

            def open_shard(cancel: threading.Event | None) -> None:
                stream.shard = StreamedShard(stream.path, room, self._staging_buffer(), cancel)

            self._run(open_shard)
            self._header_used = len(header_bytes([], _SHARD_METADATA)[0])

        def append(cancel: threading.Event | None, stream: _OpenStream = self._stream) -> None:
            stream.shard.append(entry.tensor)  # type: ignore[union-attr, arg-type]
            if entry.on_written is not None:
                entry.on_written(entry.tensor)  # type: ignore[arg-type]

        self._run(append, holds_tensors=True)
        self._pending.append(header_entry)
        self._pending_bytes += entry.nbytes
        self._header_used += grows

    def _finish_stream(self) -> None:
        stream, entries = self._stream, self._pending
        assert stream is not None
        self._run(lambda cancel: stream.shard.finish(entries, _SHARD_METADATA), completes_shard=True)  # type: ignore[union-attr]
        self._shards.append((stream.path, [e.name for e in entries], self._pending_bytes))
        self._stream = None
        self._pending, self._pending_bytes = [], 0

    def flush(self) -> None:
        """Write the tensors added so far as one shard (``streamed``: finish the open one)."""
        if not self._pending:
            return
        if self._stream is not None:
            self._finish_stream()
            return
        path = self._temp_path()
        names = [e.name for e in self._pending]
        size = self._write(path, self._pending, _SHARD_METADATA)
        self._shards.append((path, names, size))
        self._pending, self._pending_bytes = [], 0

    def link_shard(self, src_path: Path, names: list[str] | None = None) -> bool:
        """Add a whole existing shard (hard link, else copy). ``names``: the tensors to index (default all).
        Returns True when hard-linked."""
        self.flush()
        header, _ = read_header(Path(src_path))
        names = list(header) if names is None else list(names)
        missing = [n for n in names if n not in header]
        if missing:
            raise ValueError(f"{src_path} has no tensor {missing[0]!r}")
        self._claim(names)
        path = self._temp_path()
        self._shards.append((path, names, sum(info.nbytes for info in header.values())))
        if _hardlink(Path(src_path), path):
            self.linked += 1
            return True
        self._run(lambda cancel: copy_file(Path(src_path), path, cancel), completes_shard=True)  # another filesystem
        return False

    def rewrite_shard(self, src_path: Path, *, keep: list[str], add: dict[str, torch.Tensor] | None = None) -> None:
        """Write a new shard holding ``keep`` (byte-copied from ``src_path``, in that order) then ``add``."""
        self.flush()
        src_path = Path(src_path)
        header, metadata = read_header(src_path)
        entries = [Entry(n, header[n].dtype, header[n].shape, header[n].nbytes, source=(src_path, header[n])) for n in keep]
        entries += [memory_entry(n, t.detach().to("cpu").contiguous()) for n, t in (add or {}).items()]
        self._claim(e.name for e in entries)
        path = self._temp_path()
        names = [e.name for e in entries]
        size = self._write(path, entries, {**_SHARD_METADATA, **{k: str(v) for k, v in metadata.items()}})
        self._shards.append((path, names, size))

    def close(self, extra_index_entries: dict[str, str] | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
        """Wait for queued writes (``on_progress(done, total)`` as they finish), name shards
        ``model-0000i-of-0000N.safetensors``, write the index; returns the weight map."""
        self.flush()
        if self._writes is not None:
            self._writes.wait(on_progress, counted=self._shard_jobs)
        total = len(self._shards)
        weight_map: dict[str, str] = {}
        total_size = 0
        for number, (path, names, size) in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{total:05d}.safetensors"
            os.rename(path, self.out_dir / final)
            weight_map.update({name: final for name in names})
            total_size += size
        weight_map.update(extra_index_entries or {})
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        self.closed = True
        return weight_map

