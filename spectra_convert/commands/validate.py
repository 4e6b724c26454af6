"""``spectra-convert validate``: routing metrics on held-out text, a report folder, and a CI gate.

A thin shell over ``spectra_convert.validate.api.validate``: options in, rich progress on stderr, the router
comparison table on stdout, exit 1 with one line when a threshold fails (the report is still written).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import click

from ..console import err_console, progress, summary_table
from ..errors import ThresholdFailed
from ..validate import DEFAULT_MAX_LENGTH, DEFAULT_MAX_TOKENS
from ..validate.report import check_lines, metric_rows
from . import checked


@click.command(name="validate")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Held-out text: JSONL with 'text' (optional 'domain') or .txt.")
@click.option("--parent", default=None,
              help="The dense or original MoE model (folder or .gguf file) for perplexity and gate agreement.")
@click.option("--baselines", is_flag=True, help="Also route the same tokens with switch top-1/top-2, expert choice, "
              "hash, loss-free-bias and latent prototype (lpr) routers, each also driving the experts for a "
              "perplexity.")
@click.option("--max-cv", type=checked("validate", "max_cv"), default=None, help="Fail (exit 1) when the worst layer's load CV exceeds this.")
@click.option("--max-ppl-ratio", type=checked("validate", "max_ppl_ratio"), default=None,
              help="Fail (exit 1) when perplexity / parent perplexity exceeds this (needs --parent).")
@click.option("--report-dir", "-o", "--output", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Where to write report.json, report.md and plots [default: ./validation-<model-name>].")
@click.option("--max-tokens", type=checked("validate", "max_tokens"), default=DEFAULT_MAX_TOKENS, show_default=True,
              help="Total real tokens to route.")
@click.option("--max-length", type=checked("validate", "max_length"), default=DEFAULT_MAX_LENGTH, show_default=True,
              help="Each text is truncated to this many tokens.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
@click.option("--dtype", type=checked("validate", "dtype"), default=None,
              help="Weights dtype for the measurement [default: float32 on CPU, the checkpoint's on GPU].")
@click.option("--force", is_flag=True, help="Replace an existing report folder.")
@click.option("--seed", type=checked("validate", "seed"), default=0, show_default=True, help="Seed of the hash baseline.")
def command(model: str, data: Path, parent: str | None, baselines: bool, max_cv: float | None,
            max_ppl_ratio: float | None, report_dir: Path | None, max_tokens: int, max_length: int,
            device: str | None, dtype: str | None, force: bool, seed: int) -> None:
    """Measure the routing of a SPECTRA MODEL on held-out text and write a report."""
    from ..validate.api import validate  # imports torch: not at module level, --help lists this verb

    with ExitStack() as stack:
        bars: list = []  # the progress display starts with the first long step, so early errors print alone

        def make_tick(description: str, total: int) -> Callable[[int], None]:
            if not bars:
                bars.append(stack.enter_context(progress()))
            task = bars[0].add_task(description, total=total, unit="tok")  # totals count tokens
            return lambda done: bars[0].advance(task, done)

        failed: ThresholdFailed | None = None
        try:
            report = validate(model, data, parent=parent, baselines=baselines, max_cv=max_cv,
                              max_ppl_ratio=max_ppl_ratio, report_dir=report_dir, max_tokens=max_tokens,
                              max_length=max_length, device=device, dtype=dtype, force=force, seed=seed,
                              progress=make_tick)
        except ThresholdFailed as exc:
            failed, report = exc, getattr(exc, "report", None)
            if report is None:
                raise
    summary_table(f"SPECTRA routing on {report['tokens']} held-out tokens ({report['num_layers']} layers, "
                  f"{report['num_experts']} experts, top-{report['top_k']})",
                  *metric_rows(report))
    for line in check_lines(report):
        err_console.print(line, markup=False, highlight=False)
    err_console.print(f"report: {report['report_dir']}", markup=False, highlight=False)
    if failed is not None:
        raise failed
