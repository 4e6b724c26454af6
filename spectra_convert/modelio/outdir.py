"""Atomic output folders: built in a temp folder next to OUT and renamed into place at the end.

An interrupted conversion leaves nothing half-written; OUT is never overwritten without ``--force`` and may
not lie inside an input, nor an input inside it (the rename or ``--force`` would then destroy the input).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import UserError


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: Path, *, force: bool, inputs: Iterable[Path]) -> Path:
    """The checks ``atomic_output_dir`` makes before any work, callable on their own by a verb that spends
    time (training) before it opens the folder; returns ``out`` resolved.

    ``out`` must not exist (unless ``force``), must not be or lie inside an input, and no input may lie inside
    ``out`` (``--force`` would delete it)."""
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
    return target


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, force: bool, inputs: Iterable[Path], durable: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success rename it to ``out``, on any error remove it.

    ``check_output``'s checks happen before any work. ``durable``: every file is fsynced before the rename and
    the parent folder after it, so a power loss cannot leave ``out`` with empty files (cheap when the big files
    were written with ``O_DIRECT`` and fsynced already, as upcycle's are).
    """
    out = Path(out).expanduser()
    target = check_output(out, force=force, inputs=inputs)
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
    unreadable to the user's group or a serving account. Hard-linked files are left alone: they are the
    input's own files (reroute links unchanged shards), and a chmod would change the input."""
    for folder, dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.lstat().st_nlink == 1 and not path.is_symlink():
                os.chmod(path, 0o666 & ~umask)
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

