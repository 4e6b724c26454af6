"""O_DIRECT shard writes: the same bytes as buffered writes, through a small reused aligned buffer."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spectra_convert.surgery.checkpoint import ShardWriter, read_header
from spectra_convert.surgery.direct_io import ALIGN, Cancelled, DirectFile, StagingBuffer


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


def test_on_written_gets_each_tensor_back_after_its_bytes_are_in_the_file(tmp_path: Path) -> None:
    seen: list[tuple[str, bool]] = []

    def written(name: str):
        def callback(tensor: torch.Tensor) -> None:
            on_disk = any(name in read_header(p)[0] for p in tmp_path.glob(".shard-*.safetensors.tmp"))
            seen.append((name, on_disk))
            tensor.fill_(-1.0)  # the caller may now reuse the buffer: the file must not change
        return callback

    originals = {f"t{i}": torch.full((1024,), float(i)) for i in range(6)}
    with ShardWriter(tmp_path, max_shard_bytes=8192, background=True) as writer:
        for name, tensor in originals.items():
            writer.add(name, tensor.clone(), on_written=written(name))
        weight_map = writer.close()
    assert sorted(seen) == [(name, True) for name in originals]
    for name, tensor in originals.items():
        assert torch.equal(load_file(tmp_path / weight_map[name])[name], tensor)
