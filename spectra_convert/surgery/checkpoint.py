"""Checkpoint I/O for the converters: model folders in, safetensors shards out, atomically.

Why it is hand-rolled around the safetensors *format* rather than ``save_pretrained``: converters must never
hold a whole model (mergekit #54/#157: conversions killed by RAM, half-written output). So

* ``CheckpointReader`` validates every shard's header up front (a corrupt or truncated file fails in one line
  naming it, before any expensive work) and reads one tensor at a time with ``pread`` — no mmap, so the bytes
  it touches do not linger in the process's resident set.
* ``ShardWriter`` writes shards as they fill (memory ~ one shard), hard-links untouched shards, and rewrites a
  shard that needs a few tensors changed *by streaming the other tensors' bytes* from the source file
  (``copy_file_range``): expert tensors keep their names and exact bytes and never enter Python memory.
* ``atomic_output_dir`` builds the output in a temp folder next to OUT and renames it into place at the end,
  so an interrupted conversion leaves nothing half-written; OUT is never overwritten without ``--force`` and
  may not lie inside an input (a rename would then destroy the input).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .direct_io import Cancelled, StagingBuffer
from .safetensors_files import (_DTYPE_SIZES, StreamedShard, _copy_file, _Entry, _header_bytes, _memory_entry,
                                _torch_dtype, _write_safetensors, header_entry_bytes, header_reserve)

if TYPE_CHECKING:  # torch is imported lazily: reroute starts copying shards before torch/transformers load
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
AUTO_MAP = {"AutoConfig": "configuration_spectra.SpectraConfig", "AutoModelForCausalLM": "modeling_spectra.SpectraForCausalLM"}
RUNTIME_FILES = ("configuration_spectra.py", "modeling_spectra.py")

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


# ---------------------------------------------------------------------------------------------------------------
# Resolving MODEL and reading its config
# ---------------------------------------------------------------------------------------------------------------


def _looks_like_hub_id(model: str) -> bool:
    return bool(_HUB_ID.fullmatch(model)) and ".." not in model and not model.startswith(".")


def resolve_model_dir(model: str, *, allow_patterns: list[str] | None = None, download: bool = True,
                      what: str = "") -> Path:
    """A local model folder for ``model``: the folder itself, or a Hub snapshot in the HF cache.

    A path that exists must be a folder. A missing path that looks like a Hub id (``org/name``) is fetched with
    ``huggingface_hub.snapshot_download``; any failure to reach the Hub (offline, no network) is one line that
    tells the user to pass a local folder instead. ``download=False`` (validate) only looks in the local
    cache. ``what`` names the argument in errors (e.g. ``--parent``).
    """
    label = f"{what} {model}" if what else str(model)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{label}: not a folder; pass a model folder (the one that holds config.json) or a "
                            "Hugging Face Hub id")
        return path.resolve()
    if not _looks_like_hub_id(model):
        raise UserError(f"{label}: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    patterns = allow_patterns or ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if not download:
        try:
            return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True)).resolve()
        except Exception:  # any failure means "not available offline"
            raise UserError(f"{label}: not a local folder and not in the local Hugging Face cache; download it "
                            "first or pass a local folder") from None
    try:
        return Path(snapshot_download(model, allow_patterns=patterns)).resolve()
    except RepositoryNotFoundError:
        raise UserError(f"{label}: no such local folder and no such model on the Hugging Face Hub") from None
    except Exception as exc:  # any network/offline/cache failure: the fix is the same
        raise UserError(
            f"{label}: no such local folder, and cannot download {model!r} from the Hugging Face Hub (offline?): "
            f"pass a local model folder ({type(exc).__name__})"
        ) from None


def read_raw_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` as a dict, checked to be a supported parent — without importing transformers (reroute
    reads it to start copying shards while the heavy imports still run)."""
    from .adapters import ADAPTERS, supported_message

    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir}: not a model folder (no config.json)")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_path}: not a valid JSON config ({_first_line(exc)})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise UserError(f"{config_path}: no 'model_type' field; not a transformers model config")
    model_type = raw["model_type"]
    if model_type == "spectra":
        raise UserError(f"{model_dir} is already a SPECTRA model; convert its parent model instead")
    if model_type not in ADAPTERS:
        raise UserError(f"unsupported architecture {model_type!r}; {supported_message()}")
    return raw


def read_parent_config(model_dir: Path, gguf_file: str | None = None) -> Any:
    """The parent's ``PretrainedConfig``; one-line errors for a folder that is not a (supported) model."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if gguf_file:
        try:
            return AutoConfig.from_pretrained(model_dir, gguf_file=gguf_file)
        except Exception as exc:  # gguf parsing errors come in many types
            raise UserError(f"{model_dir / gguf_file}: cannot read a model config from this GGUF file ({_first_line(exc)})") from None
    raw = read_raw_config(model_dir)
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{model_dir / 'config.json'}: cannot build a {raw['model_type']} config ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Atomic output folder
# ---------------------------------------------------------------------------------------------------------------


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, force: bool, inputs: Iterable[Path], durable: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success rename it to ``out``, on any error remove it.

    Checks happen before any work: ``out`` must not exist (unless ``force``), must not be or lie inside an
    input, and no input may lie inside ``out`` (``--force`` would delete it). ``durable``: every file is fsynced
    before the rename and the parent folder after it, so a power loss cannot leave ``out`` with empty files
    (cheap when the big files were written with ``O_DIRECT`` and fsynced already, as upcycle's are).
    """
    out = Path(out).expanduser()
    target = out.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if _is_within(target, source):
            raise UserError(f"output folder {out} is inside the input {item}; choose an output outside it")
        if _is_within(source, target):
            raise UserError(f"the input {item} is inside the output folder {out}; choose another output")
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} exists; pass --force to overwrite")
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a folder; remove it or choose another output")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary folder
    except OSError as exc:
        raise UserError(f"cannot create the output folder next to {out} ({exc.strerror or exc})") from None
    try:
        yield tmp
        _apply_umask(tmp, umask)
        if durable:
            _fsync_tree(tmp)
        _move_into_place(tmp, target, force=force)
        if durable:
            _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent: where a folder about to be written will live."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_free_space(out: Path, needed: int) -> None:
    """One-line ``UserError`` when the filesystem that will hold ``out`` has fewer than ``needed`` bytes free:
    a conversion that runs out of disk half-way has spent minutes for nothing (and fills the disk for others)."""
    from ..console import human_bytes

    probe = existing_ancestor(out)
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise UserError(f"not enough free disk space for {out}: the output needs about {human_bytes(needed)} "
                        f"({needed} bytes), {probe} has {human_bytes(free)} ({free} bytes) free")


def _apply_umask(root: Path, umask: int) -> None:
    """Give every file under ``root`` the mode a plain ``open`` would (0666 minus the umask): safetensors'
    ``save_file`` (inside ``save_pretrained``) writes through a private temp file and leaves weights 0600,
    unreadable to the user's group or a serving account."""
    for folder, dirs, files in os.walk(root):
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~umask)
        for name in dirs:
            os.chmod(Path(folder) / name, 0o777 & ~umask)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (folders too: their entries are what a rename publishes)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _move_into_place(tmp: Path, target: Path, *, force: bool) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if not force:  # appeared while we were working
        raise UserError(f"{target} exists; pass --force to overwrite")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / "previous")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old / "previous", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# safetensors format: header validation, reading one tensor, streaming writes
# ---------------------------------------------------------------------------------------------------------------


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
        if dtype not in _DTYPE_SIZES:
            raise bad(f"unsupported dtype {dtype!r} of {name!r}")
        numel = 1
        for dim in shape:
            numel *= dim
        itemsize = _DTYPE_SIZES[dtype]
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
    return buffer.view(_torch_dtype(info.dtype)).reshape(info.shape)


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

    def total_bytes(self) -> int:
        return sum(info.nbytes for header in self.headers.values() for info in header.values())


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
        self._pending: list[_Entry] = []
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

    def _write(self, path: Path, entries: list[_Entry], metadata: dict[str, str]) -> int:
        """Write (or queue) one shard; returns its data size (known from the entries before writing)."""

        def write(cancel: threading.Event | None) -> None:
            try:
                _write_safetensors(path, entries, metadata, cancel, self._staging_buffer())
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
        entry = _memory_entry(name, tensor.detach().to("cpu").contiguous(), on_written)
        self._claim([name])
        if self.streamed:
            self._add_streamed(entry)
            return
        if self._pending and self._pending_bytes + entry.nbytes > self.max_shard_bytes:
            self.flush()
        self._pending.append(entry)
        self._pending_bytes += entry.nbytes

    def _add_streamed(self, entry: _Entry) -> None:
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
            self._header_used = len(_header_bytes([], _SHARD_METADATA)[0])

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
        self._run(lambda cancel: _copy_file(Path(src_path), path, cancel), completes_shard=True)  # another filesystem
        return False

    def rewrite_shard(self, src_path: Path, *, keep: list[str], add: dict[str, torch.Tensor] | None = None) -> None:
        """Write a new shard holding ``keep`` (byte-copied from ``src_path``, in that order) then ``add``."""
        self.flush()
        src_path = Path(src_path)
        header, metadata = read_header(src_path)
        entries = [_Entry(n, header[n].dtype, header[n].shape, header[n].nbytes, source=(src_path, header[n])) for n in keep]
        entries += [_memory_entry(n, t.detach().to("cpu").contiguous()) for n, t in (add or {}).items()]
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


# ---------------------------------------------------------------------------------------------------------------
# Everything else in an output folder
# ---------------------------------------------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".onnx", ".npz")
_NOT_COPIED = {"config.json", "README.md", INDEX_NAME, "pytorch_model.bin.index.json"}
_SIDE_DIRS = ("additional_chat_templates",)


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy tokenizer files, generation config, chat templates, licence... (not weights, config.json, code,
    or the parent's README, which the model card replaces). Returns the names copied."""
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        name = path.name
        if name.startswith(".") or name in _NOT_COPIED:
            continue
        if path.is_dir():
            if name in _SIDE_DIRS:
                shutil.copytree(path, Path(dst_dir) / name)
                copied.append(name + "/")
            continue
        if path.suffix in _WEIGHT_SUFFIXES or path.suffix == ".py" or name.endswith(".index.json"):
            continue
        shutil.copyfile(path, Path(dst_dir) / name)
        copied.append(name)
    return copied


def write_runtime_files(dst_dir: Path) -> None:
    """Ship the SPECTRA runtime (``configuration_spectra.py``, ``modeling_spectra.py``) inside the folder."""
    runtime = Path(__file__).resolve().parent.parent / "modeling"
    for name in RUNTIME_FILES:
        shutil.copyfile(runtime / name, Path(dst_dir) / name)


def write_spectra_config(dst_dir: Path, spectra_config: Any) -> Path:
    """Write ``config.json`` with ``auto_map`` and ``architectures`` so transformers finds the shipped code."""
    config = copy.deepcopy(spectra_config)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["SpectraForCausalLM"]
    path = Path(dst_dir) / "config.json"
    config.to_json_file(path, use_diff=True)
    return path
