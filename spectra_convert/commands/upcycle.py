"""``spectra-convert upcycle``: dense FFN -> SPECTRA experts, calibrated (thin shell over surgery.upcycle)."""

from __future__ import annotations

import click


@click.command("upcycle")
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output folder (must not exist).")
@click.option("--experts", default=8, show_default=True, help="Experts per MoE layer.")
@click.option("--top-k", default=2, show_default=True, help="Experts used per token.")
@click.option("--method", type=click.Choice(["copy", "split"]), default="copy", show_default=True,
              help="copy: each expert = dense FFN + noise (perplexity unchanged); split: neurons partitioned "
                   "into experts (LLaMA-MoE style: needs continued pre-training — on SmolLM2-135M 8x top-2 "
                   "held-out perplexity goes from 10.8 to ~10^7 before training).")
@click.option("--split-mode", type=click.Choice(["random", "balanced"]), default="random", show_default=True,
              help="How --method split partitions neurons.")
@click.option("--noise", default=0.01, show_default=True, help="Relative std of the noise added to expert copies.")
@click.option("--router-dim", default=128, show_default=True, help="Router GRU/expression dimension.")
@click.option("--router-init", type=click.Choice(["orthogonal", "kmeans"]), default="orthogonal", show_default=True,
              help="Prototype init: orthonormal (balances best on unseen text) or k-means on calibration states.")
@click.option("--calibration", type=click.Path(), default=None,
              help="Calibration text (JSONL with `text` or .txt); default: the shipped real-text corpus.")
@click.option("--calibration-tokens", default=8192, show_default=True, help="Tokens used for router calibration.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, help="Output dtype (default fp32).")
@click.option("--gguf-file", default=None, help="GGUF file inside MODEL to load (weights are dequantised).")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
def command(model: str, out: str, **options) -> None:
    """Upcycle the dense causal LM MODEL (folder or Hub id) into a SPECTRA mixture of experts."""
    from . import cyclic_gc_paused

    with cyclic_gc_paused():
        from ..surgery.upcycle import upcycle

        upcycle(model, out, **options)
