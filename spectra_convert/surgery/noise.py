"""Gaussian noise for upcycled experts, drawn ahead of use by worker threads.

Why: drawing E x (dense FFN) standard normals is most of an upcycle's compute (SmolLM2 8x: 637M draws,
about 3 s on one core), and torch's CPU generator is single-threaded. The noise does not depend on the
weights, only on their shapes, so it can be drawn while the main thread loads the parent, captures router
inputs and calibrates routers, and it can be drawn on several cores at once.

Determinism: every ``CHUNK``-sized piece of every buffer has its own generator, seeded from (seed, layer,
tensor, piece), so the values depend only on ``seed`` and the shapes — not on how many workers there are or
how the threads are scheduled. Memory stays bounded: at most ``layers_ahead`` layers of noise exist before
they are taken (docs/ARCHITECTURE.md, "Conversions": an upcycle holds a few MoE layers above the parent,
never E full models).

Recycling: a buffer handed back with ``recycle`` (once its bytes are written) is drawn into again instead of
allocating a new one. A fresh multi-MB buffer costs a page fault and a kernel zeroing per page — and on a VM
first-touch backing by the hypervisor — which measured 14% of an upcycle's CPU time on the 2-core CI box,
about as much as drawing the normals; recycled buffers are warm.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

#: Elements per independently seeded piece (4 M floats = 16 MB): large enough that per-piece overhead is nil,
#: small enough that the workers share even one tensor evenly.
CHUNK = 1 << 22


def piece_seed(seed: int, layer: int, tensor: int, piece: int) -> int:
    """A distinct 63-bit generator seed for one piece (splitmix64-style mixing of the four indices)."""
    value = (seed * 0x9E3779B97F4A7C15 + layer * 0xBF58476D1CE4E5B9 + tensor * 0x94D049BB133111EB + piece) & (2**64 - 1)
    value ^= value >> 31
    value = (value * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    value ^= value >> 27
    return value & (2**63 - 1)


class NoiseAhead:
    """Standard-normal float32 buffers, one per (layer, tensor), produced in layer order by ``workers`` threads.

    ``sizes[layer]`` lists the element counts of that layer's noisy tensors, in the order ``take`` returns them.
    ``take(layer)`` blocks until that layer's buffers are ready and frees its slot so the workers move on.
    ``layers_ahead=2`` keeps two workers busy (one layer is ~10 pieces) while holding the fewest buffers: on
    the 2-core box it was 0.2 s faster than 3 once buffers are recycled (fewer fresh pages).
    Use as a context manager: leaving it cancels queued work and waits for the running pieces."""

    def __init__(self, sizes: list[list[int]], seed: int, *, workers: int = 2, layers_ahead: int = 2) -> None:
        self._sizes = sizes
        self._seed = seed
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="spectra-noise", initializer=lower_thread_priority)
        self._ahead = threading.Semaphore(max(1, layers_ahead))
        self._pending: dict[int, tuple[list[torch.Tensor], list[Future]]] = {}
        self._next = 0  # next layer to schedule
        self._lock = threading.Lock()
        self._closed = False
        self._free: dict[int, list[torch.Tensor]] = {}  # recycled buffers by element count
        self._schedule_available()

    def recycle(self, buffer: torch.Tensor) -> None:
        """Hand back a buffer ``take`` returned, once nothing reads it any more (its values get overwritten)."""
        if buffer.dtype != torch.float32 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError("only the flat float32 buffers take() returned can be recycled")
        with self._lock:
            if not self._closed:
                self._free.setdefault(buffer.numel(), []).append(buffer)

    def _buffer(self, numel: int) -> torch.Tensor:
        free = self._free.get(numel)
        return free.pop() if free else torch.empty(numel, dtype=torch.float32)

    def _schedule_available(self) -> None:
        """Queue the pieces of as many further layers as the ``layers_ahead`` budget allows (never blocks)."""
        with self._lock:
            while not self._closed and self._next < len(self._sizes) and self._ahead.acquire(blocking=False):
                layer = self._next
                self._next += 1
                buffers = [self._buffer(n) for n in self._sizes[layer]]
                futures = [
                    self._pool.submit(_fill_normal, buffer[start : start + CHUNK], piece_seed(self._seed, layer, t, p))
                    for t, buffer in enumerate(buffers)
                    for p, start in enumerate(range(0, buffer.numel(), CHUNK))
                ]
                self._pending[layer] = (buffers, futures)

    def take(self, layer: int) -> list[torch.Tensor]:
        """Layer ``layer``'s buffers (flat, float32), waiting for them if they are still being drawn."""
        if layer not in self._pending:
            raise KeyError(f"noise for layer {layer} was not scheduled (layers must be taken in order, once)")
        buffers, futures = self._pending.pop(layer)
        for future in futures:
            future.result()
        self._ahead.release()
        self._schedule_available()
        return buffers

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._free.clear()

    def __enter__(self) -> NoiseAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lower_thread_priority() -> None:
    """Run the calling thread at the lowest CPU priority (Linux threads have their own nice value): background
    work then only fills cores the critical path leaves idle instead of slowing it down."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: same result, only less overlap
        pass


def _fill_normal(piece: torch.Tensor, seed: int) -> None:
    piece.normal_(generator=torch.Generator().manual_seed(seed))
