"""Writing a file from memory with ``O_DIRECT``: the bytes go from a reused aligned buffer to the disk, not
through the page cache.

Why: an upcycle writes gigabytes of freshly built expert tensors. A buffered write copies every byte into new
page-cache pages, and on a VM those pages are often memory the guest has not touched for a while, which the
hypervisor backs on first touch: measured on the 2-core CI box, that copy was 19% of all CPU time of an
upcycle (3 core-seconds for 2.8 GB), more than drawing the noise. Through ``O_DIRECT`` the device's DMA reads
the tensor's own memory when it is block-aligned (torch's huge-page allocations are), or else a small warm
staging buffer the CPU copied the bytes into, while the CPU builds the next layer; the data is on the disk when
the call returns (nothing left for a final ``sync``), and a multi-GB conversion does not push the user's page
cache out.

``O_DIRECT`` needs the buffer address, the file offset and every length aligned to the device's block size:
the stream is assembled in a page-aligned buffer (``mmap``), every write is a whole multiple of
``ALIGN``, and the zero-padded tail is cut off with ``ftruncate``. Where a filesystem refuses ``O_DIRECT``
(at open, or with ``EINVAL`` on the first write), ``DirectFile.open`` returns ``None`` and the caller writes
the ordinary way.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from pathlib import Path

ALIGN = 4096  # a multiple of every common logical block size (512, 4096)
STAGING_BYTES = 16 * 1024 * 1024
_DIRECT_CHUNK = 64 * 1024 * 1024  # bytes per write straight from the caller's memory


class Cancelled(Exception):
    """A background write was stopped because the conversion failed elsewhere."""


class StagingBuffer:
    """A page-aligned buffer reused by every direct write of one writer thread (warm after its first use)."""

    def __init__(self, size: int = STAGING_BYTES) -> None:
        if size <= 0 or size % ALIGN:
            raise ValueError(f"staging size must be a positive multiple of {ALIGN}, got {size}")
        self.size = size
        self._map = mmap.mmap(-1, size)
        self.view = memoryview(self._map)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))


class DirectFile:
    """An ``O_DIRECT`` file written front to back: ``put(address, count)`` appends bytes from memory (straight
    from it when block-aligned, else through a ``StagingBuffer``), ``finish()`` writes the padded tail (and a
    head into the room left before the data), trims the file to its true size and fsyncs it.

    Staging copies use ``ctypes.memmove`` and writes ``os.write``, both of which release the GIL, so a writer
    thread does not stall the Python threads building tensors."""

    def __init__(self, fd: int, path: Path, staging: StagingBuffer, cancel: threading.Event | None, start: int) -> None:
        self.fd, self.path, self.staging, self.cancel = fd, path, staging, cancel
        self.start = start  # file offset of the first ``put`` byte (room for a ``head`` written at ``finish``)
        self.fill = 0  # bytes waiting in the staging buffer
        self.flushed = 0  # bytes already on disk

    @classmethod
    def open(cls, path: Path, staging: StagingBuffer, cancel: threading.Event | None = None, *,
             start: int = 0) -> DirectFile | None:
        """A new (truncated) file at ``path`` opened for direct writes from offset ``start`` (a multiple of
        ``ALIGN``), or ``None`` where direct I/O is not available (no ``O_DIRECT`` on this OS, or the filesystem
        refuses it — tried with one aligned write)."""
        if start % ALIGN:
            raise ValueError(f"start offset must be a multiple of {ALIGN}, got {start}")
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o666)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise
        try:  # some filesystems accept the flag at open and refuse the first write
            os.write(fd, staging.view[:ALIGN])
            os.ftruncate(fd, 0)
            os.lseek(fd, start, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                os.unlink(path)
                return None
            raise
        return cls(fd, Path(path), staging, cancel, start)

    def put(self, address: int, count: int) -> None:
        """Append ``count`` bytes starting at memory ``address`` (kept alive by the caller). When nothing is
        staged and ``address`` is block-aligned (torch's huge-page allocations are), the whole blocks go to the
        disk straight from the caller's memory, with no copy at all; only a tail shorter than a block is staged."""
        if self.fill == 0 and address % ALIGN == 0 and count >= ALIGN:
            whole = count - count % ALIGN
            for offset in range(0, whole, _DIRECT_CHUNK):  # chunks: a cancel is seen between them
                length = min(_DIRECT_CHUNK, whole - offset)
                self._write_view(memoryview((ctypes.c_char * length).from_address(address + offset)).cast("B"))
            self.flushed += whole
            address += whole
            count -= whole
        size = self.staging.size
        while count:
            n = min(count, size - self.fill)
            ctypes.memmove(self.staging.address + self.fill, address, n)
            self.fill += n
            address += n
            count -= n
            if self.fill == size:
                self._write_staged(size)

    def put_bytes(self, data: bytes) -> None:
        buffer = ctypes.create_string_buffer(data, len(data))
        self.put(ctypes.addressof(buffer), len(data))

    def _write_view(self, view: memoryview, offset: int | None = None) -> None:
        """Write ``view`` (aligned memory) at the file position, or at ``offset``."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled
        try:
            while view:
                if offset is None:
                    done = os.write(self.fd, view)
                else:
                    done = os.pwrite(self.fd, view, offset)
                    offset += done
                if done <= 0:
                    raise OSError(errno.EIO, "direct write made no progress")
                view = view[done:]
        except OSError as exc:  # e.g. a full disk: name the file in the user's one-line error
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def _write_staged(self, length: int) -> None:
        self._write_view(self.staging.view[:length])
        self.flushed += self.fill
        self.fill = 0

    def finish(self, head: bytes = b"") -> int:
        """Write what is staged (zero-padded to ``ALIGN``), then ``head`` at offset 0 (exactly ``start`` bytes:
        what the stream left room for), cut the padding off, fsync; returns the file size. The fsync is cheap
        here (the data is already on the device) and makes the file durable before the output folder is renamed
        into place."""
        if len(head) != self.start:
            raise ValueError(f"head must fill the {self.start} bytes reserved before the data, got {len(head)}")
        total = self.start + self.flushed + self.fill
        if self.fill:
            padded = -(-self.fill // ALIGN) * ALIGN
            ctypes.memset(self.staging.address + self.fill, 0, padded - self.fill)
            self._write_staged(padded)
        for offset in range(0, len(head), self.staging.size):  # the staging buffer is free now
            piece = head[offset : offset + self.staging.size]
            ctypes.memmove(self.staging.address, piece, len(piece))
            self._write_view(self.staging.view[: len(piece)], offset)
        os.ftruncate(self.fd, total)
        os.fsync(self.fd)
        return total

    def close(self) -> None:
        os.close(self.fd)
