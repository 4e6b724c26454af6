"""``spectra-convert reroute``: keep an MoE model's experts, replace its gates by SPECTRA routers
(thin shell over ``surgery.reroute``)."""

from __future__ import annotations

import click

from . import checked, output_option


@click.command("reroute")
@click.argument("model")
@output_option("Output folder (must not exist).")
@click.option("--router-init", type=checked("reroute", "router_init"), default="gate", show_default=True,
              help="gate: expert vectors from the old gate rows; distill: train the router to imitate the old "
                   "gate on calibration text; kmeans: prototypes from calibration hidden states only.")
@click.option("--calibration", type=click.Path(), default=None,
              help="Calibration text (JSONL with `text` or .txt); default: the shipped real-text corpus.")
@click.option("--calibration-tokens", default=8192, show_default=True, type=checked("reroute", "calibration_tokens"),
              help="Tokens of calibration text run through the model.")
@click.option("--router-dim", default=128, show_default=True, type=checked("reroute", "router_dim"),
              help="Router GRU/expression dimension.")
@click.option("--seed", default=0, show_default=True, type=checked("reroute", "seed"))
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
def command(model: str, out: str, **options) -> None:
    """Reroute the MoE model MODEL (folder or Hub id): same experts, calibrated SPECTRA routers."""
    from . import cyclic_gc_paused

    with cyclic_gc_paused():
        from ..surgery.reroute import reroute

        reroute(model, out, **options)
