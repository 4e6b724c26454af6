"""``spectra-convert upcycle``: dense FFN -> SPECTRA experts, calibrated (thin shell over surgery.upcycle)."""

from __future__ import annotations

import click

from . import checked, output_option


@click.command("upcycle")
@click.argument("model")
@output_option("Output folder (must not exist).")
@click.option("--experts", default=8, show_default=True, type=checked("upcycle", "experts"), help="Experts per MoE layer.")
@click.option("--top-k", default=2, show_default=True, type=checked("upcycle", "top_k"), help="Experts used per token.")
@click.option("--method", type=checked("upcycle", "method"), default="copy", show_default=True,
              help="copy: each expert = dense FFN + noise (perplexity unchanged); split: neurons partitioned "
                   "into experts (LLaMA-MoE style: needs continued pre-training — on SmolLM2-135M 8x top-2 "
                   "held-out perplexity goes from 10.8 to ~10^7 before training).")
@click.option("--split-mode", type=checked("upcycle", "split_mode"), default="random", show_default=True,
              help="How --method split partitions neurons.")
@click.option("--noise", default=0.01, show_default=True, type=checked("upcycle", "noise"), help="Relative std of the noise added to expert copies.")
@click.option("--router-dim", default=128, show_default=True, type=checked("upcycle", "router_dim"), help="Router GRU/expression dimension.")
@click.option("--router-init", type=checked("upcycle", "router_init"), default="orthogonal", show_default=True,
              help="Prototype init: orthonormal (balances best on unseen text) or k-means on calibration states.")
@click.option("--calibration", type=click.Path(), default=None,
              help="Calibration text (JSONL with `text` or .txt); default: the shipped real-text corpus.")
@click.option("--calibration-tokens", default=8192, show_default=True, type=checked("upcycle", "calibration_tokens"), help="Tokens used for router calibration.")
@click.option("--dtype", type=checked("upcycle", "dtype"), default=None, help="Output dtype (default float32).")
@click.option("--gguf-file", default=None, help="GGUF file inside MODEL to load (weights are dequantised).")
@click.option("--seed", default=0, show_default=True, type=checked("upcycle", "seed"))
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
def command(model: str, out: str, **options) -> None:
    """Upcycle the dense causal LM MODEL (folder or Hub id) into a SPECTRA mixture of experts."""
    from . import cyclic_gc_paused

    with cyclic_gc_paused():
        from ..surgery.upcycle import upcycle

        upcycle(model, out, **options)
