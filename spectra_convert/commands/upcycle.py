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
              help="copy: each expert = dense FFN + noise (perplexity unchanged, E x the FFN memory); drop: copies "
                   "with --drop-ratio of each expert's neurons re-initialised (Drop-Upcycling, for continued "
                   "pre-training); carve: a shared expert + E disjoint slices of the parent's neurons, routed by a "
                   "SPECTRA router fitted to predict them (a cheaper model, no training).")
@click.option("--drop-ratio", default=0.5, show_default=True, type=checked("upcycle", "drop_ratio"),
              help="--method drop: share of neurons re-initialised.")
@click.option("--shared-fraction", default=None, type=checked("upcycle", "shared_fraction"),
              help="--method carve: share of the FFN neurons in the always-on shared expert [default: 5/12 = "
                   "0.4167: at 8 experts top-2 runs 56% of the neurons, top-5 78%].")
@click.option("--carve-grouping", type=checked("upcycle", "carve_grouping"), default="coactivation",
              show_default=True, help="--method carve: balanced k-means on co-activation, or random slices.")
@click.option("--carve-refit", type=checked("upcycle", "carve_refit"), default="none", show_default=True,
              help="--method carve: least-squares refit of each expert's output scale on calibration tokens.")
@click.option("--router-steps", default=None, type=checked("upcycle", "router_steps"),
              help="--method carve: listwise gradient steps fitting each router to the oracle after its ridge fit, "
                   "kept only while held-out recall improves [default: 0, the ridge fit alone: the steps raised "
                   "recall but not perplexity on unseen text].")
@click.option("--skipped-estimate-rank", default=None, type=checked("upcycle", "skipped_estimate_rank"),
              help="--method carve: rank of the linear estimate of the unselected experts' output added to each "
                   "block (0 = none) [default: 64].")
@click.option("--carve-bias", default=None, type=checked("upcycle", "carve_bias"),
              help="--method carve: routers' dual bias: 'balance' (equal expert loads) or 'recall' (only as strong "
                   "as held-out oracle recall allows: ~6% lower perplexity, less balanced) [default: balance].")
@click.option("--noise", default=0.01, show_default=True, type=checked("upcycle", "noise"), help="Relative std of the noise added to expert copies.")
@click.option("--router-dim", default=None, type=checked("upcycle", "router_dim"),
              help="Router GRU/expression dimension [default: 64; 32 for --method carve].")
@click.option("--router-init", type=checked("upcycle", "router_init"), default="orthogonal", show_default=True,
              help="Prototype init: orthonormal (balances best on unseen text) or k-means on calibration states.")
@click.option("--calibration", type=click.Path(), default=None,
              help="Calibration text (JSONL with `text` or .txt); default: the shipped real-text corpus.")
@click.option("--calibration-tokens", default=None, type=checked("upcycle", "calibration_tokens"),
              help="Tokens used for router calibration [default: 8192; 32768 for --method carve].")
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
