#!/usr/bin/env python
"""SPECTRA MoE block vs transformers' MixtralSparseMoeBlock on CPU, measured side by side in one run.

What it answers (targets from the project brief):

* block forward time, SPECTRA / Mixtral, same shapes, 8 experts, top-2, 2048 tokens (batch 4 x 512): <= 1.1x
* the router's share of the SPECTRA block time (``block.gate`` alone on the same input): <= 10 %
* decode-step router time: one new token with the GRU state cached (``RoutingContext.cache`` holding a
  ``SpectraCache`` whose ``spectra_router_states[layer]`` has the state) vs recomputing the router over the
  whole 512-token sequence: >= 10x

Both blocks run in eval mode under ``torch.inference_mode()``; the expert weights are the same tensors in both
(so expert FLOPs match) and SPECTRA's dual bias is corrected on the input until its top-2 loads are balanced
(what calibration does). Timings interleave the two blocks (A, B, A, B, ...) so that load from other processes
hits both alike; each number is a median after warm-up. Info rows (no target) add Mixtral's ``grouped_mm``
experts kernel (what ``from_pretrained`` picks by default) and an experts-only comparison with identical
routing, which separates dispatch cost from router cost.

Usage: ``python bench/moe_block.py [--threads N] [--repeats R] [--shapes small,large] [--profile]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from spectra_convert.modeling.configuration_spectra import SpectraConfig
from spectra_convert.modeling.modeling_spectra import RoutingContext, SpectraCache, SpectraMoeBlock

SHAPES = {"small": (576, 1536), "large": (2048, 5632)}  # (hidden, intermediate): SmolLM2-135M, TinyLlama-1.1B
NUM_EXPERTS, TOP_K, BATCH, SEQ = 8, 2, 4, 512
TARGET_BLOCK_RATIO, TARGET_ROUTER_SHARE, TARGET_DECODE_SPEEDUP = 1.1, 0.10, 10.0

console = Console(width=160)  # the table is wide; keep it unwrapped in logs


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time (ms) of each callable, measured interleaved so background load affects all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def build_blocks(hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    heads = hidden // 64
    spectra_config = SpectraConfig(
        text_config=LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                                num_key_value_heads=heads, num_hidden_layers=1, hidden_act="silu"),
        spectra={"num_experts": NUM_EXPERTS, "top_k": TOP_K},
    )
    context = RoutingContext()
    spectra = SpectraMoeBlock(spectra_config.text_config, spectra_config.spectra, 0, context)

    def mixtral_block(impl: str) -> MixtralSparseMoeBlock:
        config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=NUM_EXPERTS,
                               num_experts_per_tok=TOP_K, hidden_act="silu", num_attention_heads=heads,
                               num_key_value_heads=heads, num_hidden_layers=1, experts_implementation=impl)
        block = MixtralSparseMoeBlock(config)
        # Same expert tensors as SPECTRA's (shared storage: same FLOPs, no extra memory); a real gate init.
        block.experts.gate_up_proj = spectra.experts.gate_up_proj
        block.experts.down_proj = spectra.experts.down_proj
        return block

    eager = mixtral_block("eager")
    with torch.no_grad():
        eager.gate.weight.normal_(0.0, 0.02)
    grouped = mixtral_block("grouped_mm")
    grouped.gate.weight = eager.gate.weight
    blocks = [b.to(dtype).eval() for b in (spectra, eager, grouped)]
    return (*blocks, context)


@torch.inference_mode()
def balance_spectra(block: SpectraMoeBlock, x: torch.Tensor, steps: int = 30) -> None:
    """Correct the dual bias on hard top-k loads of ``x`` (what calibration does), so expert GEMMs are even."""
    for _ in range(steps):
        _, _, selected = block.gate(x)
        block.gate.correct_bias(torch.bincount(selected.reshape(-1), minlength=NUM_EXPERTS), 1.0)


def load_cv(selected: torch.Tensor) -> float:
    loads = torch.bincount(selected.reshape(-1), minlength=NUM_EXPERTS).double()
    return float(loads.std(unbiased=False) / loads.mean())


def verdict(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


@torch.inference_mode()
def bench_shape(name: str, hidden: int, inter: int, args: argparse.Namespace, table: Table) -> dict[str, float]:
    dtype = getattr(torch, args.dtype)
    spectra, eager, grouped, context = build_blocks(hidden, inter, dtype)
    x = torch.randn(BATCH, SEQ, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    balance_spectra(spectra, x)
    flat = x.reshape(-1, hidden)
    _, s_weights, s_selected = spectra.gate(x)
    _, m_weights, m_selected = eager.gate(flat)
    label = f"{name} {hidden}/{inter}"
    repeats = args.repeats or (10 if hidden <= 1024 else 4)

    # 1. Whole blocks (+ router alone, + experts alone on one routing), interleaved.
    t = median_ms({
        "spectra": lambda: spectra(x),
        "mixtral": lambda: eager(x),
        "mixtral_grouped": lambda: grouped(x),
        "router": lambda: spectra.gate(x),
        "experts_spectra": lambda: spectra.experts(flat, s_selected, s_weights),
        "experts_mixtral": lambda: eager.experts(flat, s_selected, s_weights),
    }, repeats, args.warmup)

    # 2. Decode: one new token per row with each row's GRU state cached vs the router over all 512 tokens.
    cache = SpectraCache(config=LlamaConfig(num_hidden_layers=1))
    context.cache = cache
    spectra.gate(x)  # fills cache.spectra_router_states[0] with each row's state after 512 tokens
    # state = [GRU state | running routing sums (E) | token count]
    assert cache.spectra_router_states[0].shape == (BATCH, spectra.gate.router_dim + spectra.gate.num_experts + 1)
    step = x[:, -1:, :].contiguous()
    decode = median_ms({"cached_step": lambda: spectra.gate(step)}, repeats * 20, args.warmup * 10)
    context.cache = None
    full = median_ms({"full": lambda: spectra.gate(x)}, repeats, args.warmup)

    ratio = t["spectra"] / t["mixtral"]
    share = t["router"] / t["spectra"]
    speedup = full["full"] / decode["cached_step"]
    rows = [
        ("block forward, vs Mixtral eager", t["spectra"], t["mixtral"], f"{ratio:.2f}x", "<= 1.1x",
         verdict(ratio <= TARGET_BLOCK_RATIO)),
        ("block forward, vs Mixtral grouped_mm", t["spectra"], t["mixtral_grouped"],
         f"{t['spectra'] / t['mixtral_grouped']:.2f}x", "info", ""),
        ("experts only, same routing", t["experts_spectra"], t["experts_mixtral"],
         f"{t['experts_spectra'] / t['experts_mixtral']:.2f}x", "info", ""),
        ("router share of SPECTRA block", t["router"], t["spectra"], f"{share:.1%}", "<= 10%",
         verdict(share <= TARGET_ROUTER_SHARE)),
        ("decode router: 1 cached token vs 512", decode["cached_step"], full["full"], f"{speedup:.0f}x faster",
         ">= 10x", verdict(speedup >= TARGET_DECODE_SPEEDUP)),
    ]
    for metric, ours, ref, ratio_text, target, result in rows:
        table.add_row(label, metric, f"{ours:.2f}", f"{ref:.2f}", ratio_text, target, result)
    table.add_row(label, "load CV (top-2) on this input", f"{load_cv(s_selected):.3f}", f"{load_cv(m_selected):.3f}",
                  "", "info", "", end_section=True)

    if args.profile:
        profile(spectra, x, label)
    return {"ratio": ratio, "share": share, "speedup": speedup}


def profile(block: SpectraMoeBlock, x: torch.Tensor, label: str) -> None:
    """Where SPECTRA's block time goes: torch profiler, ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    block(x)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with record_function("router"):
                _, weights, selected = block.gate(x)
            with record_function("experts"):
                block.experts(x.reshape(-1, x.shape[-1]), selected, weights)
    console.print(f"[bold]profile of the SPECTRA block, {label} (3 forwards)[/]")
    console.print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per shape (default 10 small / 4 large)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--shapes", default="small,large", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--profile", action="store_true", help="also print a torch profile of the SPECTRA block")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")

    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
                  f"{NUM_EXPERTS} experts top-{TOP_K}, tokens {BATCH} x {SEQ}, load avg {os.getloadavg()[0]:.2f}")
    table = Table(title="SPECTRA MoE block vs Mixtral (CPU, median ms)")
    for column in ("shape H/I", "metric", "SPECTRA ms", "reference ms", "ratio", "target", "result"):
        table.add_column(column, justify="right" if column.endswith("ms") else "left")
    for name in shapes:
        bench_shape(name, *SHAPES[name], args, table)
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
