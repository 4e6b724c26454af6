"""O_DIRECT shard writes: the same bytes as buffered writes, through a small reused aligned buffer."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spectra_convert.modelio.checkpoint import ShardWriter
from spectra_convert.modelio.safetensors_files import read_header
from spectra_convert.modelio.direct_io import ALIGN, Cancelled, DirectFile, StagingBuffer


def test_direct_file_writes_exact_bytes_across_staging_boundaries(tmp_path: Path) -> None:
    staging = StagingBuffer(2 * ALIGN)
    pieces = [os.urandom(n) for n in (0, 1, ALIGN - 1, 2 * ALIGN, 3 * ALIGN + 5, 7)]
    path = tmp_path / "out.bin"
    direct = DirectFile.open(path, staging)
    assert direct is not None, "this filesystem (ext4/tmpfs) supports O_DIRECT"
    try:
        assert fcntl.fcntl(direct.fd, fcntl.F_GETFL) & os.O_DIRECT  # really bypassing the page cache
        for piece in pieces:
            direct.put_bytes(piece)
        assert direct.finish() == sum(map(len, pieces))
    finally:
        direct.close()
    assert path.read_bytes() == b"".join(pieces)  # the zero padding of the last block is cut off


def test_staging_size_must_be_block_aligned() -> None:
    with pytest.raises(ValueError, match="multiple"):
        StagingBuffer(ALIGN + 1)


def test_a_cancelled_direct_write_stops_at_the_next_block(tmp_path: Path) -> None:
    cancel = threading.Event()
    direct = DirectFile.open(tmp_path / "out.bin", StagingBuffer(ALIGN), cancel)
    assert direct is not None
    cancel.set()
    with pytest.raises(Cancelled):
        direct.put_bytes(b"x" * (ALIGN + 1))
    direct.close()


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(5 * 1024 * 1024 + 3, generator=g),  # 20 MB: spans the 16 MB staging buffer
        "odd": torch.randn(7, 13, generator=g).to(torch.bfloat16),  # 182 bytes: unaligned offsets after it
        "ints": torch.arange(1001, dtype=torch.int64),
        "empty": torch.zeros(0),
        "last": torch.randn(3, generator=g),
    }


@pytest.mark.parametrize("background", [False, True])
def test_direct_and_buffered_shards_are_byte_identical(tmp_path: Path, background: bool) -> None:
    tensors = _tensors()
    folders = {}
    for direct in (True, False):
        folder = tmp_path / f"direct-{direct}"
        folder.mkdir()
        with ShardWriter(folder, max_shard_bytes=16 * 1024 * 1024, background=background, direct_io=direct) as writer:
            for name, tensor in tensors.items():
                writer.add(name, tensor)
            writer.close()
        folders[direct] = folder
    names = sorted(p.name for p in folders[True].iterdir())
    assert names == sorted(p.name for p in folders[False].iterdir()) and len(names) == 3  # 2 shards + index
    for name in names:
        assert (folders[True] / name).read_bytes() == (folders[False] / name).read_bytes(), name
    loaded = {}
    for shard in folders[True].glob("*.safetensors"):
        loaded.update(load_file(shard))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("streamed", [False, True])
def test_on_written_gets_each_tensor_back_after_its_bytes_are_in_the_file(tmp_path: Path, streamed: bool) -> None:
    seen: list[tuple[str, bool]] = []

    def written(name: str):
        def callback(tensor: torch.Tensor) -> None:
            # a whole shard has its header when its tensors come back; a streamed one gets it when it is full
            on_disk = streamed or any(name in read_header(p)[0] for p in tmp_path.glob(".shard-*.safetensors.tmp"))
            seen.append((name, on_disk))
            tensor.fill_(-1.0)  # the caller may now reuse the buffer: the file must not change
        return callback

    originals = {f"t{i}": torch.full((1024,), float(i)) for i in range(6)}
    with ShardWriter(tmp_path, max_shard_bytes=8192, background=True, streamed=streamed) as writer:
        for name, tensor in originals.items():
            writer.add(name, tensor.clone(), on_written=written(name))
        weight_map = writer.close()
    assert sorted(seen) == [(name, True) for name in originals]
    for name, tensor in originals.items():
        assert torch.equal(load_file(tmp_path / weight_map[name])[name], tensor)


def _load_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import json

    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        loaded.update(load_file(folder / shard))
    return loaded, weight_map


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("direct", [True, False])
def test_streamed_shards_hold_the_same_tensors_in_the_same_shards(tmp_path: Path, background: bool, direct: bool) -> None:
    """Streamed shards (data first, header last into the reserved room) load like whole ones: same tensors,
    same shard split, valid safetensors files whose header is exactly the reserved size."""
    from safetensors import safe_open

    from spectra_convert.modelio.safetensors_files import header_reserve

    tensors = _tensors()
    folders = {}
    for streamed in (False, True):
        folder = tmp_path / f"streamed-{streamed}"
        folder.mkdir()
        with ShardWriter(folder, max_shard_bytes=16 * 1024 * 1024, background=background, direct_io=direct,
                         streamed=streamed) as writer:
            for name, tensor in tensors.items():
                writer.add(name, tensor)
            writer.close()
        folders[streamed] = folder
    whole, whole_map = _load_folder(folders[False])
    streamed, streamed_map = _load_folder(folders[True])
    assert streamed_map == whole_map
    assert streamed.keys() == tensors.keys() and all(torch.equal(streamed[n], t) for n, t in tensors.items())
    for shard in folders[True].glob("*.safetensors"):
        assert 8 + int.from_bytes(shard.read_bytes()[:8], "little") == header_reserve(16 * 1024 * 1024)
        with safe_open(str(shard), framework="pt") as handle:  # the reference reader accepts the padding
            assert all(torch.equal(handle.get_tensor(n), tensors[n]) for n in handle.keys())


def test_a_full_header_room_starts_a_new_streamed_shard(tmp_path: Path) -> None:
    """Many small tensors with long names fill a streamed shard's 4 KB header room before its data limit."""
    tensors = {f"model.layers.{i}.a_rather_long_module_name.weight": torch.full((4,), float(i)) for i in range(120)}
    with ShardWriter(tmp_path, max_shard_bytes=1024 * 1024, streamed=True) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.close()
    loaded, weight_map = _load_folder(tmp_path)
    assert len(set(weight_map.values())) > 1  # 120 tensors x ~100 header bytes > 4 KB; 1.9 KB of data < 1 MB
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("streamed", [False, True])
def test_close_reports_progress_in_shards_not_tensors(tmp_path: Path, streamed: bool) -> None:
    calls: list[tuple[int, int]] = []
    with ShardWriter(tmp_path, max_shard_bytes=8192, background=True, streamed=streamed) as writer:
        for i in range(12):
            writer.add(f"t{i}", torch.full((1024,), float(i)))  # 4 KB each: 2 per shard
        weight_map = writer.close(on_progress=lambda done, total: calls.append((done, total)))
    assert len(set(weight_map.values())) == 6
    assert calls[-1] == (6, 6) and {total for _, total in calls} == {6}


def test_aligned_memory_goes_to_disk_without_a_staging_copy(tmp_path: Path) -> None:
    """Whole blocks of an aligned source are written from the source itself; the staging buffer only ever sees
    the unaligned tail (and the header)."""
    import ctypes
    import mmap

    staging = StagingBuffer(2 * ALIGN)
    ctypes.memset(staging.address, 0xAB, staging.size)  # a sentinel no copy may overwrite
    source = mmap.mmap(-1, 5 * ALIGN)  # page-aligned
    payload = os.urandom(3 * ALIGN + 100)
    source[: len(payload)] = payload
    address = ctypes.addressof(ctypes.c_char.from_buffer(source))
    direct = DirectFile.open(tmp_path / "out.bin", staging)
    assert direct is not None
    try:
        direct.put(address, 3 * ALIGN)
        assert bytes(staging.view) == b"\xab" * staging.size  # nothing was staged
        direct.put(address + 3 * ALIGN, 100)  # the tail is staged
        direct.finish()
    finally:
        direct.close()
    assert (tmp_path / "out.bin").read_bytes() == payload
