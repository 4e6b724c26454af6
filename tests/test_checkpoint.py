"""Checkpoint I/O: header validation, one-tensor reads, streamed shard writing, atomic output folders.

Everything is checked against the reference safetensors reader (``safe_open``) and real ``save_pretrained``
output of a tiny random Mixtral (structural test: random weights)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spectra_convert.errors import UserError
from spectra_convert.modelio import safetensors_files, side_files
from spectra_convert.modelio.checkpoint import CheckpointReader, ShardWriter
from spectra_convert.modelio.config import read_parent_config
from spectra_convert.modelio.outdir import atomic_output_dir
from spectra_convert.modelio.resolve import resolve_model_dir
from spectra_convert.modelio.safetensors_files import read_header
from tests.tiny_checkpoints import save_tiny_moe


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixtral")
    save_tiny_moe("mixtral", folder, max_shard_size="50KB")
    return folder


def _reference(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# -- reading ---------------------------------------------------------------------------------------------------


def test_reader_matches_safe_open_on_sharded_checkpoint(mixtral_dir: Path) -> None:
    reader = CheckpointReader(mixtral_dir)
    weight_map = json.loads((mixtral_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(reader.shards) > 2
    assert sorted(reader.keys()) == sorted(weight_map)
    for shard in reader.shards:
        for name, tensor in _reference(shard).items():
            assert reader.shard_of(name) == shard
            got = reader.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)


def test_reader_single_file_and_bf16(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5), "c": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path)
    assert set(reader.keys()) == {"a", "b", "c"}
    for name, tensor in tensors.items():
        assert torch.equal(reader.get(name), tensor) and reader.get(name).dtype == tensor.dtype


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "bad_json"])
def test_corrupt_safetensors_is_one_line_error_naming_the_file(mixtral_dir: Path, tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for path in mixtral_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        victim.write_bytes(b"not a safetensors file at all" * 10)
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        victim.write_bytes(data[:8] + b"#" + data[9:])
    with pytest.raises(UserError) as info:
        CheckpointReader(folder)
    assert victim.name in str(info.value) and "\n" not in str(info.value)


def test_missing_weights_and_missing_shard(tmp_path: Path, mixtral_dir: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="only safetensors"):
        CheckpointReader(tmp_path)
    folder = tmp_path / "m"
    folder.mkdir()
    for path in mixtral_dir.iterdir():
        if not path.name.startswith("model-00002-of-"):
            (folder / path.name).write_bytes(path.read_bytes())
    with pytest.raises(UserError, match="missing"):
        CheckpointReader(folder)


def test_read_parent_config_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not a model folder \(no config.json\)"):
        read_parent_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid JSON config"):
        read_parent_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="unsupported architecture 'bert'; supported: gpt2"):
        read_parent_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch_xyz"}))
    with pytest.raises(UserError, match="unsupported architecture"):
        read_parent_config(tmp_path)


def test_resolve_model_dir(tmp_path: Path, monkeypatch) -> None:
    assert resolve_model_dir(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(UserError, match="no such folder"):
        resolve_model_dir(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        resolve_model_dir(str(tmp_path / "file"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        resolve_model_dir("someorg/somemodel")
    assert "from the Hugging Face Hub (offline?): pass a local model folder" in str(info.value)


# -- writing ---------------------------------------------------------------------------------------------------


def test_shard_writer_splits_and_indexes(tmp_path: Path) -> None:
    tensors = {f"layer.{i}.weight": torch.randn(64, 32) for i in range(6)}  # 8 KiB each
    writer = ShardWriter(tmp_path, max_shard_bytes=20_000)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    weight_map = writer.close()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == 6 * 64 * 32 * 4
    loaded = {}
    for name in files:
        loaded.update(_reference(tmp_path / name))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="twice"):
        w = ShardWriter(tmp_path / "x")
        w.add("a", torch.zeros(1))
        w.add("a", torch.zeros(1))


def test_link_and_rewrite_shard_keep_bytes(tmp_path: Path, mixtral_dir: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    shards = sorted(mixtral_dir.glob("model-*.safetensors"))
    writer = ShardWriter(out)
    assert writer.link_shard(shards[0])
    source = _reference(shards[1])
    dropped = sorted(source)[0]
    new = {"new.router.vectors": torch.randn(4, 8), "new.router.bias": torch.zeros(4, dtype=torch.bfloat16)}
    writer.rewrite_shard(shards[1], keep=[k for k in source if k != dropped], add=new)
    writer.add("extra", torch.ones(3))
    weight_map = writer.close()
    linked, rewritten, extra = (out / f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
    assert os.stat(linked).st_ino == os.stat(shards[0]).st_ino
    got = _reference(rewritten)
    assert dropped not in got and set(got) == (set(source) - {dropped}) | set(new)
    src_header, _ = read_header(shards[1])
    out_header, metadata = read_header(rewritten)
    assert metadata["format"] == "pt"
    raw_src, raw_out = shards[1].read_bytes(), rewritten.read_bytes()
    for name in set(source) - {dropped}:  # byte-identical, not merely equal values
        a, b = src_header[name], out_header[name]
        assert raw_src[a.start : a.end] == raw_out[b.start : b.end]
    assert all(torch.equal(got[k], v) for k, v in new.items())
    assert weight_map["extra"] == extra.name and weight_map["new.router.bias"] == rewritten.name
    assert _reference(extra)["extra"].tolist() == [1.0, 1.0, 1.0]


def _write_mixed(writer: ShardWriter, shards: list[Path]) -> dict[str, str]:
    """The same mixed sequence of link / rewrite / add, for the sync and background writers."""
    writer.link_shard(shards[0])
    source = _reference(shards[1])
    dropped = sorted(source)[0]
    writer.rewrite_shard(shards[1], keep=[k for k in source if k != dropped])
    writer.rewrite_shard(shards[2], keep=list(_reference(shards[2])), add={"new.bias": torch.arange(4.0)})
    for i in range(5):
        writer.add(f"extra.{i}", torch.full((64, 32), float(i)))
    return writer.close()


def test_background_writer_writes_the_same_bytes(tmp_path: Path, mixtral_dir: Path) -> None:
    shards = sorted(mixtral_dir.glob("model-*.safetensors"))
    sync_dir, background_dir = tmp_path / "sync", tmp_path / "background"
    sync_dir.mkdir()
    background_dir.mkdir()
    sync_map = _write_mixed(ShardWriter(sync_dir, max_shard_bytes=20_000), shards)
    with ShardWriter(background_dir, max_shard_bytes=20_000, background=True, max_queued_shards=1) as writer:
        background_map = _write_mixed(writer, shards)
    assert sync_map == background_map
    names = sorted(p.name for p in sync_dir.iterdir())
    assert names == sorted(p.name for p in background_dir.iterdir()) and len(names) >= 5
    for name in names:
        assert (sync_dir / name).read_bytes() == (background_dir / name).read_bytes(), name


@contextmanager
def _copies_held(monkeypatch) -> Iterator[None]:
    """Hold the writer thread's byte copies until the block exits, so a test can damage a source file
    before the thread reads it: without this the thread may copy it first and the failure under test
    never happens (on an idle box it always did, so the tests failed there)."""
    import threading

    release = threading.Event()
    real_copy = safetensors_files._copy_range

    def held_copy(*args, **kwargs):
        release.wait(30)
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(safetensors_files, "_copy_range", held_copy)
    try:
        yield
    finally:
        release.set()


def test_background_writer_reports_errors_and_cancels(tmp_path: Path, mixtral_dir: Path, monkeypatch) -> None:
    shards = sorted(mixtral_dir.glob("model-*.safetensors"))
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(shards[1].read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out, background=True)
    with _copies_held(monkeypatch):
        writer.rewrite_shard(victim, keep=list(_reference(victim)))
        os.truncate(victim, 8)  # the source is damaged before the thread copies it
    with pytest.raises((OSError, UserError), match="truncated|progress|No such file"):
        writer.close()
    # an error on the main thread cancels queued copies, and atomic_output_dir then removes the temp folder
    target = tmp_path / "result"
    with pytest.raises(RuntimeError, match="calibration failed"):
        with atomic_output_dir(target, force=False, inputs=[mixtral_dir]) as tmp, \
                ShardWriter(tmp, background=True) as writer:
            for shard in shards:
                writer.rewrite_shard(shard, keep=list(_reference(shard)))
            raise RuntimeError("calibration failed")
    assert not target.exists() and not list(tmp_path.glob(".result.tmp-*"))


def test_background_writer_failure_does_not_block_later_shards(tmp_path: Path, mixtral_dir: Path, monkeypatch) -> None:
    """In-memory shards wait for a queue slot; jobs skipped after a failure must still free theirs."""
    import threading

    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(sorted(mixtral_dir.glob("model-*.safetensors"))[1].read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out, max_shard_bytes=1, background=True, max_queued_shards=1)
    with _copies_held(monkeypatch):
        writer.rewrite_shard(victim, keep=list(_reference(victim)))
        os.truncate(victim, 8)  # damaged before the thread copies it: the job fails for sure
    outcome: dict[str, BaseException] = {}

    def feed() -> None:
        try:
            for i in range(6):  # max_shard_bytes=1: every add flushes the previous tensor as a queued shard
                writer.add(f"t{i}", torch.ones(8))
            writer.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "writer deadlocked after a failed background job"
    assert isinstance(outcome.get("error"), (OSError, UserError)), outcome


def test_rewrite_copies_adjacent_tensors_in_one_run(mixtral_dir: Path) -> None:
    shard = max(mixtral_dir.glob("model-*.safetensors"), key=lambda p: len(read_header(p)[0]))
    header, _ = read_header(shard)
    entries = [safetensors_files.Entry(n, i.dtype, i.shape, i.nbytes, source=(shard, i)) for n, i in header.items()]
    ordered = sorted(entries, key=lambda e: e.source[1].start)
    runs = list(safetensors_files._source_runs(ordered))
    assert len(runs) == 1 and runs[0][1] == sum(e.nbytes for e in entries)
    gap = ordered[:1] + ordered[2:]  # dropping a tensor splits the run in two
    assert [length for _, length in safetensors_files._source_runs(gap)] == [ordered[0].nbytes, sum(e.nbytes for e in ordered[2:])]


def test_link_shard_falls_back_to_copy(tmp_path: Path, mixtral_dir: Path) -> None:
    src = sorted(mixtral_dir.glob("model-*.safetensors"))[0]
    linked_dir = tmp_path / "linked"
    linked_dir.mkdir()
    assert ShardWriter(linked_dir).link_shard(src)
    assert os.stat(linked_dir / ".shard-00000.safetensors.tmp").st_ino == os.stat(src).st_ino
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(mixtral_dir).st_dev and os.access(shm, os.W_OK):
        copy_dir = shm / f"spectra-test-{os.getpid()}"
        copy_dir.mkdir()
        try:
            for background in (False, True):
                with ShardWriter(copy_dir, background=background) as writer:
                    assert not writer.link_shard(src)  # another filesystem: copied
                    writer.close()
                dst = copy_dir / "model-00001-of-00001.safetensors"
                assert dst.read_bytes() == src.read_bytes() and os.stat(dst).st_ino != os.stat(src).st_ino
                dst.unlink()
        finally:
            shutil.rmtree(copy_dir, ignore_errors=True)


# -- atomic output ----------------------------------------------------------------------------------------------


def test_atomic_output_success_failure_and_force(tmp_path: Path) -> None:
    source = tmp_path / "model"
    source.mkdir()
    out = tmp_path / "out"
    with atomic_output_dir(out, force=False, inputs=[source]) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(UserError, match="exists; pass --force to overwrite"):
        with atomic_output_dir(out, force=False, inputs=[source]):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True, inputs=[source]) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # temp folder removed, out untouched
    assert (out / "a").exists()
    with atomic_output_dir(out, force=True, inputs=[source]) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


@pytest.mark.parametrize("where", ["inside", "same", "contains"])
def test_atomic_output_refuses_overlap_with_input(tmp_path: Path, where: str) -> None:
    source = tmp_path / "model"
    source.mkdir()
    out = {"inside": source / "sub", "same": source, "contains": tmp_path}[where]
    with pytest.raises(UserError, match="inside"):
        with atomic_output_dir(out, force=True, inputs=[source]):
            pass
    assert sorted(p.name for p in source.iterdir()) == []


def test_side_files_runtime_and_config(tmp_path: Path, mixtral_dir: Path) -> None:
    from transformers import AutoConfig

    from spectra_convert.modeling.configuration_spectra import SpectraConfig

    src = tmp_path / "src"
    src.mkdir()
    for path in mixtral_dir.iterdir():
        (src / path.name).write_bytes(path.read_bytes())
    for name in ("README.md", "chat_template.jinja", "modeling_x.py", ".gitattributes", "merges.txt"):
        (src / name).write_text("x")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool.jinja").write_text("{{ x }}")
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = side_files.copy_side_files(src, dst)
    assert sorted(copied) == ["additional_chat_templates/", "chat_template.jinja", "generation_config.json",
                              "merges.txt", "tokenizer.json", "tokenizer_config.json"]
    side_files.write_runtime_files(dst)
    parent = AutoConfig.from_pretrained(mixtral_dir)
    side_files.write_spectra_config(dst, SpectraConfig(text_config=parent.to_dict(), spectra={"num_experts": 4}))
    raw = json.loads((dst / "config.json").read_text())
    assert raw["auto_map"] == side_files.AUTO_MAP and raw["architectures"] == ["SpectraForCausalLM"]
    loaded = AutoConfig.from_pretrained(dst, trust_remote_code=True)
    assert type(loaded).__name__ == "SpectraConfig" and loaded.text_config.model_type == "mixtral"


def test_durable_atomic_output_syncs_nested_files_and_publishes_them(tmp_path: Path) -> None:
    """``durable=True`` fsyncs every file and folder (nested ones too) before the rename; the result is the same
    published folder (and a failure still leaves nothing)."""
    out = tmp_path / "out"
    with atomic_output_dir(out, force=False, inputs=[], durable=True) as tmp:
        (tmp / "sub" / "deeper").mkdir(parents=True)
        (tmp / "a.json").write_text("{}")
        (tmp / "sub" / "deeper" / "b.bin").write_bytes(b"\x00" * 10)
    assert (out / "a.json").read_text() == "{}" and (out / "sub" / "deeper" / "b.bin").stat().st_size == 10
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "failed", force=False, inputs=[], durable=True) as tmp:
        (tmp / "x").write_text("partial")
        raise RuntimeError("conversion failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
